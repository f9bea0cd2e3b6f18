"""One Flower strategy made of fedgma's own parts: :class:`FedgmaStrategy` (flwr 1.41 Message API).

A Flower ``ServerApp`` that uses :class:`FedgmaStrategy` runs the round the simulator runs: every
reply is checked, then :func:`fedgma.round.run_round` folds the good ones into a registered
aggregator (``gma``, ``mean``, ``median``, ``trimmed_mean``, ``krum``, behind optional norm
clipping) and steps a registered server optimizer (``sgd``, ``adam``, ``yogi``, ``adagrad``:
Reddi et al. 2021, Algorithm 2, the maths of ``fedgma run``) on the same
:class:`fedgma.round.ServerState`. The strategy is built from the part names and options
(``FedgmaStrategy(aggregator="gma", optimizer="adam", optimizer_options={"lr": 0.01})``) or from a
fedgma :class:`~fedgma.config.Config` (:meth:`FedgmaStrategy.from_config`).

Flower's contracts are kept: sampling, ``configure_*`` messages, ``start`` and its ``evaluate_fn``
are Flower's ``FedAvg``'s; ``train_metrics_aggr_fn`` and ``evaluate_metrics_aggr_fn`` receive
``(list of reply contents, weighted_by_key)`` as from Flower's strategies (the reply contents less
their ArrayRecords for training replies, which are folded in and freed as they arrive, so the server
holds O(d) memory). The global model kept between rounds is ``current_arrays``, as in Flower's
``FedAvgM``.

No single client can stop the server: each reply is validated before any of it is used (error
reply, exactly one ArrayRecord and one MetricRecord, a weight that is a finite number in
(0, 1e15], counters that are finite integers, the global model's array names, dtypes and shapes,
finite values, an update whose weighted sum cannot overflow the aggregator's sums). A bad reply is
dropped with a warning naming its node (``on_invalid="drop"``) or fails the round with
:class:`InvalidReplyError` (``on_invalid="fail"``). A round whose aggregate would make the model
non-finite, or not representable in an array's own dtype, leaves the model and the server
optimizer's state unchanged. Client metrics are aggregated defensively
(:func:`aggregate_metrics`), and a metric function that raises is reported, not fatal.

Dtypes: every array keeps its dtype in every round. Floating-point arrays are aggregated and
stepped as one flat vector, in float64 if any array is float64, else in float32 (float16 arrays
are computed in float32 and rounded back); integer and boolean arrays (e.g. BatchNorm's
``num_batches_tracked``) are the plain weighted average of the replies' values, rounded, and
bypass the server step.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable, Iterator
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from fedgma.aggregation import make_aggregator
from fedgma.client import ClientResult, LocalSGD, PlainClient
from fedgma.flower.metrics import MAX_WEIGHT, aggregate_metrics, call_metrics_fn, is_finite_number, weight_problem
from fedgma.flower.mixin import (
    LOST_REPLY_CODES,
    GMAMixin,
    InvalidReplyError,
    ReplyAggregator,
    StreamingGrid,
    _check_reply_options,
    _node,
    with_gma,
)
from fedgma.flower.records import Layout
from fedgma.round import BadUpdateError, ReplyPolicy, ServerState, run_round
from fedgma.server_opt import make_server_optimizer

__all__ = [
    "MAX_WEIGHT",
    "FedgmaStrategy",
    "GMAFedAdagrad",
    "GMAFedAdam",
    "GMAFedAvg",
    "GMAFedAvgM",
    "GMAFedProx",
    "GMAFedYogi",
    "GMAMixin",
    "InvalidReplyError",
    "ReplyAggregator",
    "StreamingGrid",
    "aggregate_metrics",
    "with_gma",
]

_HEADROOM = 2.0**24  # a weighted update must stay below finfo.max / _HEADROOM: 16M replies cannot overflow a sum


class _FitsDtypes:
    """A server optimizer whose step refuses a result an array's own (narrower) dtype cannot hold.

    Raises FloatingPointError before :func:`run_round` commits, so the round changes nothing.
    """

    def __init__(self, inner: Any, limits: list[tuple[slice, float]]) -> None:
        self.inner = inner
        self.limits = limits

    def step(self, params: Tensor, pseudo_grad: Tensor) -> Tensor:
        new = self.inner.step(params, pseudo_grad)
        for where, largest in self.limits:
            if bool((new[where].abs() > largest).any()):
                raise FloatingPointError("the aggregate would overflow an array's own dtype (e.g. float16)")
        return new

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------------------------


class FedgmaStrategy(FedAvg):
    """A Flower strategy whose round is fedgma's: checked replies, a registered aggregator, a server optimizer.

    Args:
        aggregator: a name in ``fedgma.registry.AGGREGATORS`` (``"gma"``, ``"mean"``, ``"median"``,
            ``"trimmed_mean"``, ``"krum"``); ``aggregator_options`` its options (e.g.
            ``{"threshold": 0.4}``), validated now (ConfigError naming the option).
        optimizer: a name in ``fedgma.registry.SERVER_OPTIMIZERS`` (``"sgd"``, ``"adam"``,
            ``"yogi"``, ``"adagrad"``); ``optimizer_options`` its options (``lr``, ``momentum``,
            ``beta1``, ``beta2``, ``eps`` = τ), validated now.
        clip_norm: clip each update to this L2 norm before aggregating (None: no clipping).
        max_update_norm: drop (or fail on) updates of larger L2 norm (None: no limit).
        min_replies: fewest valid replies a round needs; with fewer the model is left unchanged.
        on_invalid: ``"drop"`` a bad reply with a warning naming its node, or ``"fail"`` the round
            with :class:`InvalidReplyError`.
        pull_interval, max_pull_interval: first and longest pause between pulls of replies (see
            :class:`StreamingGrid`).
        seed: the seed of a rule's own randomness (``gma_random_mask`` draws its permutation of
            round r from ``torch_generator(seed, "aggregation", r)``, as the simulator does).
        **flower_options: Flower ``FedAvg``'s own (``fraction_train``, ``min_train_nodes``,
            ``weighted_by_key``, ``train_metrics_aggr_fn``, ...). The metric functions default to
            :func:`aggregate_metrics`.

    Raises:
        ConfigError: an unknown part or option. ValueError: ``on_invalid`` or ``min_replies`` out of range.

    After each round, ``last_round`` holds ``round``, ``dropped`` and ``lost`` ((node id, reason)
    pairs), ``stats`` (the aggregator's statistics) and ``outcome`` (the
    :class:`fedgma.round.RoundOutcome`); ``state`` is the :class:`fedgma.round.ServerState`.
    """

    def __init__(
        self,
        *,
        aggregator: str = "gma",
        aggregator_options: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        optimizer_options: dict[str, Any] | None = None,
        clip_norm: float | None = None,
        max_update_norm: float | None = None,
        min_replies: int = 1,
        on_invalid: str = "drop",
        pull_interval: float = 0.1,
        max_pull_interval: float = 2.0,
        seed: int = 0,
        **flower_options: Any,
    ) -> None:
        flower_options.setdefault("train_metrics_aggr_fn", aggregate_metrics)
        flower_options.setdefault("evaluate_metrics_aggr_fn", aggregate_metrics)
        super().__init__(**flower_options)
        _check_reply_options(on_invalid, min_replies, pull_interval, max_pull_interval)
        for name, value in (("clip_norm", clip_norm), ("max_update_norm", max_update_norm)):
            if value is not None and not (is_finite_number(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
        self.aggregator = aggregator
        self.aggregator_options = dict(aggregator_options or {})
        self.optimizer = optimizer
        self.optimizer_options = dict(optimizer_options or {})
        make_aggregator(aggregator, **self.aggregator_options)  # fail now on a bad name or option
        make_server_optimizer(optimizer, **self.optimizer_options)
        self.clip_norm = clip_norm
        self.max_update_norm = max_update_norm
        self.min_replies = min_replies
        self.on_invalid = on_invalid
        self.pull_interval = pull_interval
        self.max_pull_interval = max_pull_interval
        self.seed = seed
        self.current_arrays: ArrayRecord | None = None
        self.state: ServerState | None = None
        self.layout: Layout | None = None
        self.last_round: dict[str, Any] = {}
        self._stream: StreamingGrid | None = None

    @classmethod
    def from_config(cls, config: Any, **flower_options: Any) -> FedgmaStrategy:
        """The strategy of a fedgma :class:`~fedgma.config.Config`'s ``[server]`` section.

        Takes ``server.aggregator`` and ``server.optimizer`` (names and options), ``clip_norm``,
        ``max_update_norm``, ``min_clients`` and ``on_bad_update``. The client algorithm must be
        ``sgd`` (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad: FedProx's term is the
        client's); SCAFFOLD needs the app of :mod:`fedgma.flower.app`.

        Raises:
            ConfigError: a client algorithm with server-side state (SCAFFOLD).
        """
        from fedgma.config import ConfigError

        if config.client.algorithm.name != "sgd":
            raise ConfigError(f"FedgmaStrategy.from_config: client algorithm {config.client.algorithm.name!r} keeps "
                              "server-side state; use fedgma.flower.app (fedgma run --engine flower)")
        s = config.server
        return cls(aggregator=s.aggregator.name, aggregator_options=dict(s.aggregator.options),
                   optimizer=s.optimizer.name, optimizer_options=dict(s.optimizer.options), clip_norm=s.clip_norm,
                   max_update_norm=s.max_update_norm, min_replies=s.min_clients, on_invalid=s.on_bad_update,
                   **flower_options)

    # -- Flower's loop ----------------------------------------------------------------------------

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Any:
        """Flower's round loop, with replies streamed into the aggregator as they arrive."""
        if not isinstance(grid, StreamingGrid):
            grid = StreamingGrid(grid, self.pull_interval, self.max_pull_interval)  # type: ignore[assignment]
        self._stream = grid  # type: ignore[assignment]
        return super().start(grid, *args, **kwargs)

    def summary(self) -> None:
        log(INFO, "\t├──> fedgma: aggregator %s %s, server optimizer %s %s, on_invalid=%s", self.aggregator,
            self.aggregator_options, self.optimizer, self.optimizer_options, self.on_invalid)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays  # the model every reply of this round is trained from
        return super().configure_train(server_round, arrays, config, grid)

    # -- the server state -------------------------------------------------------------------------

    def make_client_algorithm(self, numel: int) -> Any:
        """The server side of the client algorithm (plain local SGD here: nothing to keep)."""
        return PlainClient(LocalSGD())  # its server side keeps nothing; the settings are the clients'

    def _state_for(self, layout: Layout, flat: Tensor) -> ServerState:
        optimizer = make_server_optimizer(self.optimizer, **self.optimizer_options)
        guarded = _FitsDtypes(optimizer, layout.narrow_limits())
        return ServerState(0, flat, guarded, self.make_client_algorithm(layout.numel))  # type: ignore[arg-type]

    def _new_aggregator(self, round_index: int = 0) -> Any:
        from fedgma.simulation import aggregator_maker

        make = aggregator_maker(self.aggregator, self.aggregator_options, None, self.clip_norm, self.seed)
        return make(round_index)

    # -- replies ----------------------------------------------------------------------------------

    def _reject(self, node: str, reason: str, server_round: int) -> None:
        if self.on_invalid == "fail":
            raise InvalidReplyError(f"round {server_round}: reply from node {node}: {reason}")
        log(WARNING, "fedgma: round %d: dropping the reply from node %s: %s", server_round, node, reason)
        self.last_round["dropped"].append((node, reason))

    def parse_reply(self, index: int, node: str, content: RecordDict) -> ClientResult:
        """One reply's content as a ClientResult (update Δ = reply − global), every part checked first.

        Raises InvalidReplyError saying what is wrong. Subclasses may read more (a client id).
        """
        layout, state = self.layout, self.state
        assert layout is not None and state is not None
        array_records, metric_records = content.array_records, content.metric_records
        if len(array_records) != 1:
            raise InvalidReplyError(f"expected exactly one ArrayRecord, found {len(array_records)}")
        if len(metric_records) != 1:
            raise InvalidReplyError(f"expected exactly one MetricRecord, found {len(metric_records)}")
        metrics = next(iter(metric_records.values()))
        weight = metrics.get(self.weighted_by_key)
        problem = weight_problem(weight, self.weighted_by_key)
        if problem:
            raise InvalidReplyError(problem)
        num_steps = metrics.get("num-steps", 0)
        if not is_finite_number(num_steps) or num_steps < 0 or num_steps != int(num_steps):
            raise InvalidReplyError(f"num-steps must be a finite integer ≥ 0, got {num_steps!r}")
        train_loss = metrics.get("train_loss", 0.0)
        if not is_finite_number(train_loss):
            raise InvalidReplyError(f"train_loss must be a finite number, got {train_loss!r}")
        arrays = next(iter(array_records.values()))
        missing, extra = sorted(set(layout.keys) - set(arrays)), sorted(set(arrays) - set(layout.keys))
        if missing or extra:
            raise InvalidReplyError(f"arrays do not match the global model (missing {missing}, unexpected {extra})")
        parts, integers = [], {}
        for key in layout.keys:
            array = arrays[key]
            expected = layout.dtypes[key]
            if str(array.dtype) != str(expected):
                raise InvalidReplyError(f"array {key!r} has dtype {array.dtype}, expected {expected}")
            if tuple(array.shape) != layout.shapes[key]:
                raise InvalidReplyError(f"array {key!r} has shape {tuple(array.shape)}, expected {layout.shapes[key]}")
            try:
                values = np.asarray(array.numpy())
            except Exception as error:  # noqa: BLE001  (corrupt bytes: say which array)
                raise InvalidReplyError(f"array {key!r} cannot be decoded: {error}") from None
            if values.dtype != expected or values.shape != layout.shapes[key]:
                raise InvalidReplyError(f"array {key!r} decodes to {values.dtype}{values.shape}")
            if key in layout.slices:
                if not np.isfinite(values).all():
                    raise InvalidReplyError(f"array {key!r} contains NaN or infinite values")
                parts.append(torch.from_numpy(values.astype(np.dtype(str(layout.dtype)[6:]))).reshape(-1))
            else:
                integers[key] = values.astype(np.float64)
        update = torch.cat(parts) - state.params
        largest = float(update.abs().max()) if update.numel() else 0.0
        limit = float(torch.finfo(layout.dtype).max) / _HEADROOM
        if not math.isfinite(largest) or largest * float(weight) > limit:
            raise InvalidReplyError(f"its update (largest |Δ| = {largest:.3g}) times its weight {weight:.3g} could "
                                    f"overflow the aggregate's {str(layout.dtype)[6:]} sums")
        if self.max_update_norm is not None:
            norm = float(update.norm())
            if not norm <= self.max_update_norm:
                raise InvalidReplyError(f"its update norm {norm:.4g} > max_update_norm = {self.max_update_norm:g}")
        result = ClientResult(index, update, float(weight), int(num_steps), float(train_loss))
        result.integers = integers  # type: ignore[attr-defined]
        return result

    def _results(self, server_round: int, replies: Iterable[Message], kept: dict[int, RecordDict],
                 nodes: dict[int, str]) -> Iterator[ClientResult]:
        destinations = self._stream.destinations if self._stream is not None else None
        index = -1
        for message in replies:  # (not enumerate: its cached result tuple would keep the previous reply alive)
            index += 1
            node = _node(message, destinations)
            try:
                if message.has_error():
                    error = message.error
                    if error.code in LOST_REPLY_CODES:
                        log(WARNING, "fedgma: no reply from node %s (going on without it): %s", node, error.reason)
                        self.last_round["lost"].append((node, f"Flower error code {error.code}: {error.reason}"))
                    else:
                        self._reject(node, f"the client reported an error (code {error.code}): {error.reason}",
                                     server_round)
                    continue
                content = message.content
                result = self.parse_reply(index, node, content)
            except InvalidReplyError as error:
                if self.on_invalid == "fail" and str(error).startswith(f"round {server_round}: "):
                    raise
                self._reject(node, str(error), server_round)
                continue
            except Exception as error:  # noqa: BLE001  (a reply so broken that reading it fails)
                self._reject(node, f"unreadable reply: {type(error).__name__}: {error}", server_round)
                continue
            kept[result.client_id] = RecordDict({**content.metric_records, **content.config_records})
            nodes[result.client_id] = node
            del message, content  # not kept while the next reply is pulled: O(d) server memory
            yield result

    # -- aggregation ------------------------------------------------------------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, run fedgma's round on the valid ones; (None, None) when the round changes nothing.

        Raises:
            RuntimeError: no global model (neither ``configure_train`` ran nor ``current_arrays`` is set).
            InvalidReplyError: a bad reply under ``on_invalid="fail"``.
        """
        if self.current_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train: the global model is unknown")
        layout = Layout.of(self.current_arrays)
        flat = layout.flatten(self.current_arrays)
        if self.state is None or self.layout is None or self.layout.keys != layout.keys \
                or self.layout.shapes != layout.shapes or self.layout.dtypes != layout.dtypes:
            self.state = self._state_for(layout, flat)
        self.layout = layout
        self.state.params = flat
        self.last_round = {"round": server_round, "dropped": [], "lost": [], "stats": {}, "outcome": None}
        kept: dict[int, RecordDict] = {}
        nodes: dict[int, str] = {}
        policy = ReplyPolicy(layout.numel, None, "drop", self.min_replies)
        saved = copy.deepcopy(self.state.server_optimizer.state_dict())
        try:
            self.state, outcome = run_round(self.state, server_round, self._results(server_round, replies, kept, nodes),
                                            functools.partial(self._new_aggregator, server_round), policy)
        except (BadUpdateError, InvalidReplyError):
            raise
        except (FloatingPointError, ValueError) as error:
            self.state.server_optimizer.load_state_dict(saved)
            self.state.params = flat
            log(WARNING, "fedgma: round %d changes nothing: %s", server_round, error)
            return None, None
        finally:
            if self._stream is not None:  # the messages the timeout cut off
                self.last_round["lost"].extend(
                    (str(node), "no reply before the round's timeout") for node in self._stream.unanswered
                )
        self.last_round["outcome"] = outcome
        self.last_round["nodes"] = {nodes[r.client_id]: r.client_id for r in outcome.accepted}
        log(INFO, "aggregate_train (fedgma): %d replies used, %d dropped, %d lost", len(outcome.accepted),
            len(self.last_round["dropped"]), len(self.last_round["lost"]))
        if not outcome.committed:
            return None, None
        self.last_round["stats"] = outcome.stats
        integers = self._integers(layout, outcome.accepted)
        self.current_arrays = layout.unflatten(self.state.params, integers)
        records = [kept[r.client_id] for r in outcome.accepted]
        metrics = call_metrics_fn(self.train_metrics_aggr_fn, records, self.weighted_by_key, "train")
        if metrics is not None:
            counts = {"num_clients": len(outcome.accepted), "num_dropped": len(self.last_round["dropped"]),
                      "num_lost": len(self.last_round["lost"])}
            for name, value in {**outcome.stats, **counts}.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "/" not in name:
                    metrics[f"{self.aggregator}-{name.replace('_', '-')}"] = value
        return self.current_arrays, metrics

    @staticmethod
    def _integers(layout: Layout, accepted: list[ClientResult]) -> dict[str, np.ndarray]:
        """The integer arrays: the accepted replies' weighted mean, rounded, in each array's dtype."""
        total = sum(r.num_samples for r in accepted)
        out = {}
        for key in layout.int_keys:
            mean = sum(r.integers[key] * (r.num_samples / total) for r in accepted)  # type: ignore[attr-defined]
            out[key] = np.asarray(np.round(mean)).astype(layout.dtypes[key]).reshape(layout.shapes[key])
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The evaluation replies that carry one MetricRecord with a usable weight, handed to the metric function."""
        contents = []
        destinations = self._stream.destinations if self._stream is not None else None
        for message in replies:
            node = _node(message, destinations)
            try:
                if message.has_error():
                    log(WARNING, "fedgma: round %d: no evaluation from node %s: %s", server_round, node,
                        message.error.reason)
                    continue
                content = message.content
                metric_records = list(content.metric_records.values())
                if len(metric_records) != 1:
                    raise InvalidReplyError(f"expected exactly one MetricRecord, found {len(metric_records)}")
                problem = weight_problem(metric_records[0].get(self.weighted_by_key), self.weighted_by_key)
                if problem:
                    raise InvalidReplyError(problem)
            except Exception as error:  # noqa: BLE001  (whatever a client sent)
                log(WARNING, "fedgma: round %d: dropping the evaluation reply from node %s: %s", server_round, node,
                    error)
                continue
            contents.append(content)
        return call_metrics_fn(self.evaluate_metrics_aggr_fn, contents, self.weighted_by_key, "evaluate")


# --------------------------------------------------------------------------------------------
# The former per-combination classes: thin aliases with fedgma's maths
# --------------------------------------------------------------------------------------------


_FLOWER_NAMES = {"eta": "lr", "server_learning_rate": "lr", "server_momentum": "momentum", "beta_1": "beta1",
                 "beta_2": "beta2", "tau": "eps"}


class _Alias(FedgmaStrategy):
    _optimizer = "sgd"
    _defaults: dict[str, Any] = {}

    def __init__(self, *, aggregator: str = "gma", threshold: float | None = None, hard: bool | None = None,
                 weighted_agreement: bool | None = None, aggregator_options: dict[str, Any] | None = None,
                 optimizer_options: dict[str, Any] | None = None, **options: Any) -> None:
        gma = {k: v for k, v in (("threshold", threshold), ("hard", hard), ("weighted_agreement", weighted_agreement))
               if v is not None}
        if gma and aggregator != "gma":
            raise ValueError(f"threshold/hard/weighted_agreement are options of aggregator 'gma', not {aggregator!r}")
        server = dict(self._defaults)
        for flower_name, name in _FLOWER_NAMES.items():
            if flower_name in options:
                server[name] = options.pop(flower_name)
        options.pop("proximal_mu", None)  # FedProx's μ is the client's (client.prox_mu); the server has none
        server.update(optimizer_options or {})
        super().__init__(aggregator=aggregator, aggregator_options={**gma, **(aggregator_options or {})},
                         optimizer=self._optimizer, optimizer_options=server, **options)


class GMAFedAvg(_Alias):
    """FedAvg + GMA: θ ← θ + m ⊙ Σ p_k Δ_k (Tenison et al. 2023); FedgmaStrategy with the ``sgd`` optimizer, lr 1."""


class GMAFedAvgM(_Alias):
    """FedAvgM + GMA: fedgma's ``sgd`` server optimizer with momentum 0.9 (Hsu et al. 2019) on GMA's aggregate."""

    _defaults = {"momentum": 0.9}


class GMAFedProx(_Alias):
    """FedProx + GMA at the server (the proximal term is the client's: send ``proximal_mu`` in the train config)."""


class GMAFedAdam(_Alias):
    """FedAdam + GMA: fedgma's ``adam`` server optimizer (Reddi et al. 2021, Algorithm 2) on GMA's aggregate."""

    _optimizer = "adam"


class GMAFedYogi(_Alias):
    """FedYogi + GMA: fedgma's ``yogi`` server optimizer (Reddi et al. 2021, Algorithm 2) on GMA's aggregate."""

    _optimizer = "yogi"


class GMAFedAdagrad(_Alias):
    """FedAdagrad + GMA: fedgma's ``adagrad`` server optimizer (Reddi et al. 2021, Algorithm 2) on GMA's aggregate."""

    _optimizer = "adagrad"
