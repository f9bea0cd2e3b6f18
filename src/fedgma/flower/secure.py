"""GMA under Flower's SecAgg+ secure aggregation (flwr 1.41, legacy workflow).

GMA needs only sums over the clients: Σ n_k Δ_k, Σ n_k (or K) and the sign sum Σ s_k sign(Δ_k). Under
SecAgg+ the server learns those sums and no single client's update. Three pieces:

* client: :func:`fedgma_secaggplus_mod`, one line in your ``ClientApp``
  (``ClientApp(client_fn=..., mods=[fedgma_secaggplus_mod])`` instead of ``mods=[secaggplus_mod]``).
  It wraps Flower's ``secaggplus_mod``: in the masked-vector stage it turns the client's ``FitRes``
  (its trained model θ_k and ``num_examples`` n_k) into the vector x_k of :func:`encode_update` and
  reports ``num_examples = 1``, then Flower's mod quantizes and masks x_k as usual.
* server: :class:`SecureGMA`, a legacy Flower ``Strategy`` (FedAvg's sampling, configuration and
  evaluation) whose ``aggregate_fit`` receives the workflow's (1/K) Σ_k x_k, recovers the sums
  (:func:`decode_aggregate`), applies fedgma's mask (:func:`fedgma.aggregation.sign_agreement`,
  :func:`fedgma.aggregation.gma_mask`) and steps a fedgma server optimizer
  (:func:`fedgma.server_opt.make_server_optimizer`: Reddi et al. 2021, Algorithm 2).
* the workflow: :func:`secure_workflow` (Flower's ``DefaultWorkflow`` with ``SecAggPlusWorkflow`` set
  up for this encoding) and :func:`run_secure` to run it from a ``ServerApp``'s main.

fedgma's own Flower app (:mod:`fedgma.flower.app`) puts the three together behind one run-config key,
``secure-aggregation = true`` (``examples/flower-app/secure``).

The encoding ("weight 1" arrangement). Flower's SecAgg+ returns Σ w_k x_k / Σ w_k with w_k the
reported ``num_examples`` quantized against ``max_weight``. The mod reports w_k = 1 and the workflow
runs with ``max_weight = 1``, so every client's weight is exactly 1 and the sample weighting is done
inside x_k::

    x_k = [ (n_k/W) · clip(Δ_k / B, -1, 1)   per float array of the model (the update, clipped to ±B)
            s_k · sign(Δ_k)                  per float array; s_k = n_k/W (weighted) or 1 (unweighted)
            [n_k/W, clipped_k] ]             n_k/W and the fraction of Δ_k's coordinates beyond ±B

with Δ_k = θ_k − θ (float64), B the update bound and W the weight scale (a power of two ≥ every n_k).
Every entry lies in [-1, 1] = Flower's ``clipping_range`` 1, which quantizes v to the integer
(v + 1)·Q/2 (stochastic rounding). Sign entries and n_k/W are multiples of 2/Q (W ≤ Q/2, both powers of
two), so they are quantized *exactly*: the server recovers the integer sign sum Σ s_k sign Δ_k and
Σ n_k without error, and the agreement, hence the mask, is bit-identical to plaintext GMA's (float32:
while the sign sums stay below 2^24). Both agreements are offered: ``weighted_agreement=False`` (the
paper's |(1/K) Σ sign Δ_k|) and ``True`` (|Σ n_k sign Δ_k| / Σ n_k). Only the update part carries
quantization error: each client's entry is off by less than one level 2/Q, so the weighted mean update
is off by less than ``2·B·W·K / (Q·Σ n_k)`` per coordinate (:func:`update_error_bound`), plus the
plaintext effect of clipping at ±B (reported as ``secure-clipped-fraction``).

Quantization range: Flower sums the quantized integers modulo 2^32, so K·Q must stay below 2^32
(:func:`quantization_range_for`: the largest power of two Q ≤ 2^30 with max_clients·Q < 2^32).

What the server still sees in plaintext: each client's ``FitRes`` metrics (whatever your client puts
there; Flower's own mod passes them through) and the number of clients. The mod replaces
``num_examples`` by 1, so per-client sample counts are hidden (Flower's plain SecAgg+ reveals them);
the sums Σ n_k, Σ n_k Δ_k (clipped) and the per-coordinate sign count are revealed by design.
See docs/PRIVACY.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import FedAvg as LegacyFedAvg

from fedgma.aggregation import gma_mask, sign_agreement
from fedgma.server_opt import make_server_optimizer

__all__ = [
    "BOUND_KEY",
    "WEIGHTED_KEY",
    "WEIGHT_SCALE_KEY",
    "SecureGMA",
    "decode_aggregate",
    "encode_update",
    "fedgma_secaggplus_mod",
    "quantization_range_for",
    "run_secure",
    "secure_workflow",
    "update_error_bound",
    "weight_scale_for",
]

BOUND_KEY = "fedgma-secure-bound"  # B: updates are clipped to ±B per coordinate
WEIGHT_SCALE_KEY = "fedgma-secure-weight-scale"  # W: a power of two ≥ every client's num_examples
WEIGHTED_KEY = "fedgma-secure-weighted"  # sign vector weighted by n_k/W (True) or not
MODULUS = 1 << 32  # Flower's modulus_range (its maximum)
CLIPPING_RANGE = 1.0  # every entry of x_k lies in [-1, 1]


def quantization_range_for(max_clients: int) -> int:
    """The largest power of two Q ≤ 2^30 with ``max_clients`` · Q < 2^32 (no wrap-around of the modular sum).

    Raises:
        ValueError: ``max_clients`` < 2 or so large that Q would be below 2^8.
    """
    if int(max_clients) < 2:
        raise ValueError(f"max_clients must be at least 2 (SecAgg+ needs two clients), got {max_clients!r}")
    q = 1 << 30
    while max_clients * q >= MODULUS:
        q >>= 1
    if q < 1 << 8:
        raise ValueError(f"max_clients={max_clients} leaves fewer than 2^8 quantization levels")
    return q


def weight_scale_for(max_examples: int, quantization_range: int) -> int:
    """W: the smallest power of two ≥ ``max_examples``; must be ≤ Q/2 so that n_k/W is quantized exactly.

    Raises:
        ValueError: ``max_examples`` < 1, or W > Q/2.
    """
    if int(max_examples) < 1:
        raise ValueError(f"max_examples must be a positive integer, got {max_examples!r}")
    w = 1 << (int(max_examples) - 1).bit_length()
    if w > quantization_range // 2:
        raise ValueError(f"max_examples={max_examples} needs weight scale {w} > Q/2 = {quantization_range // 2}")
    return w


def update_error_bound(bound: float, weight_scale: int, num_clients: int, total_examples: int,
                       quantization_range: int) -> float:
    """Bound on |secure − plaintext| of the weighted mean update per coordinate, for updates within ±B.

    Each client's quantized entry is within one level 2/Q of (n_k/W)·Δ_k/B, so the mean update
    B·W·Σ(...)/Σ n_k is within 2·B·W·K / (Q·Σ n_k) (a strict bound; stochastic rounding makes the
    typical error about √K times smaller).
    """
    return bound * (2.0 * weight_scale * num_clients / (quantization_range * total_examples))  # no overflow for huge B


# --------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------


def _float_arrays(arrays: list[np.ndarray], who: str) -> None:
    for i, array in enumerate(arrays):
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{who}: array {i} has dtype {array.dtype}; secure GMA takes float arrays only")


def encode_update(global_arrays: list[np.ndarray], local_arrays: list[np.ndarray], num_examples: int,
                  bound: float, weight_scale: int, weighted: bool) -> list[np.ndarray]:
    """The vector x_k a client submits through SecAgg+ (see the module docstring), as float64 arrays.

    Args:
        global_arrays: the round's global model θ, L float arrays (any float dtype).
        local_arrays: the client's trained model θ_k, the same L shapes.
        num_examples: n_k, an integer in [1, weight_scale].
        bound: B > 0; Δ_k = θ_k − θ (in float64) is clipped to ±B per coordinate.
        weight_scale: W, a power of two.
        weighted: multiply the sign vector by n_k/W (weighted agreement) or not.

    Returns:
        2L + 1 float64 arrays in [-1, 1]: (n_k/W)·clip(Δ/B) per array, s_k·sign(Δ) per array, and
        ``[n_k/W, fraction of coordinates with |Δ| > B]`` (shape [2]).

    Raises:
        ValueError: different numbers or shapes of arrays, non-finite values, n_k outside [1, W], B ≤ 0.
        TypeError: a non-float array.
    """
    if len(global_arrays) != len(local_arrays):
        raise ValueError(f"the client returned {len(local_arrays)} arrays, the global model has {len(global_arrays)}")
    _float_arrays(list(local_arrays), "the client's model")
    n = int(num_examples)
    if n != num_examples or not 1 <= n <= weight_scale:
        # the value is not in the message: Flower sends a ClientApp's exception text to the server in clear
        raise ValueError(f"num_examples must be an integer in [1, {weight_scale}] (the weight scale W: raise the "
                         "server's max_examples); the client's value is not shown, it would reach the server")
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"the update bound must be a finite number > 0, got {bound!r}")
    ratio = n / weight_scale
    updates, signs, clipped, total = [], [], 0, 0
    for i, (g, local) in enumerate(zip(global_arrays, local_arrays, strict=True)):
        local = np.asarray(local)
        if local.shape != np.shape(g):
            raise ValueError(f"array {i}: the client's shape {local.shape} is not the global {np.shape(g)}")
        delta = local.astype(np.float64) - np.asarray(g, dtype=np.float64)
        if not np.isfinite(delta).all():
            raise ValueError(f"array {i}: the update has non-finite values")
        clipped += int(np.count_nonzero(np.abs(delta) > bound))
        total += delta.size
        updates.append(np.clip(delta / bound, -1.0, 1.0) * ratio)
        signs.append(np.sign(delta) * (ratio if weighted else 1.0))
    extra = np.array([ratio, clipped / max(total, 1)], dtype=np.float64)
    return updates + signs + [extra]


def _secagg_message(msg: Message) -> bool:
    """A train message of the SecAgg+ protocol (it carries SecAgg+'s ConfigRecord)."""
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def _collect_stage(msg: Message) -> bool:
    return _secagg_message(msg) and msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == \
        Stage.COLLECT_MASKED_VECTORS


def fedgma_secaggplus_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower client mod: SecAgg+ (Flower's ``secaggplus_mod``) carrying GMA's encoding x_k of the update.

    Use it in place of ``secaggplus_mod``: ``ClientApp(client_fn=..., mods=[fedgma_secaggplus_mod])``.
    Your client's ``fit`` returns its trained model and ``num_examples`` as usual. In SecAgg+'s
    masked-vector stage the mod reads the global model from the incoming ``FitIns`` and the settings
    :class:`SecureGMA` put in its config (``BOUND_KEY``, ``WEIGHT_SCALE_KEY``, ``WEIGHTED_KEY``),
    replaces the reply's parameters by :func:`encode_update`'s arrays and its ``num_examples`` by 1,
    and lets Flower's mod quantize and mask them. SecAgg+'s other stages go to ``secaggplus_mod``
    unchanged, and every message that is not SecAgg+'s (no SecAgg+ ConfigRecord: a plaintext train
    message, an evaluate or query message) goes straight to ``call_next``, untouched, so a ClientApp
    can carry the mod always and still answer plaintext rounds bit for bit as without it (Flower's
    ``secaggplus_mod`` would raise KeyError on a plaintext train message). A reply it cannot encode
    (wrong shapes, non-float arrays, n_k > W, missing settings) raises ValueError/TypeError/KeyError,
    which Flower turns into an error reply: the server counts the client as dropped.
    """
    if not _secagg_message(msg):
        return call_next(msg, ctxt)
    if not _collect_stage(msg):
        return secaggplus_mod(msg, ctxt, call_next)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = fitins.config
    for key in (BOUND_KEY, WEIGHT_SCALE_KEY, WEIGHTED_KEY):
        if key not in config:
            raise KeyError(f"fedgma_secaggplus_mod: the fit config lacks {key!r}; is the server's strategy SecureGMA?")
    global_arrays = parameters_to_ndarrays(fitins.parameters)

    def encode(inner: Message, inner_ctxt: Context) -> Message:
        out = call_next(inner, inner_ctxt)
        if out.has_error():
            return out
        fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
        x = encode_update(global_arrays, parameters_to_ndarrays(fitres.parameters), fitres.num_examples,
                          float(config[BOUND_KEY]), int(config[WEIGHT_SCALE_KEY]), bool(config[WEIGHTED_KEY]))
        encoded = FitRes(status=fitres.status, parameters=ndarrays_to_parameters(x), num_examples=1,
                         metrics=fitres.metrics)
        return Message(compat.fitres_to_recorddict(encoded, keep_input=False), reply_to=inner)

    return secaggplus_mod(msg, ctxt, encode)


# --------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------


def decode_aggregate(mean: list[np.ndarray], num_clients: int, bound: float, weight_scale: int,
                     weighted: bool) -> dict[str, Any]:
    """The sums GMA needs, from the workflow's (1/K) Σ_k x_k (2L + 1 float arrays, see :func:`encode_update`).

    Returns:
        ``{"update": [L float64 arrays: Σ n_k clip(Δ_k) / Σ n_k (quantized)], "sign_sum": [L float64 arrays of
        integers: Σ n_k sign Δ_k (weighted) or Σ sign Δ_k], "normaliser": Σ n_k or K (int),
        "total_examples": Σ n_k (int), "clipped_fraction": mean over clients (float)}``.

    Raises:
        ValueError: an even number of arrays, fewer than 3, a non-finite value, or decoded sums that are
        impossible (Σ n_k < 1, |sign sum| > normaliser): the aggregate was not produced by this encoding.
    """
    if len(mean) < 3 or len(mean) % 2 == 0 or np.shape(mean[-1]) != (2,):
        raise ValueError(f"expected 2L + 1 arrays ending with a [2] array, got {len(mean)} arrays")
    if not all(np.isfinite(a).all() for a in mean):
        raise ValueError("the secure aggregate has non-finite values")
    num_arrays = (len(mean) - 1) // 2
    k = int(num_clients)
    scaled_examples = float(mean[-1][0]) * k * weight_scale
    total = int(round(scaled_examples))
    if total < 1 or abs(scaled_examples - total) > 1e-3:
        raise ValueError(f"decoded Σ n_k = {scaled_examples!r} is not a positive integer: wrong K or encoding")
    normaliser = total if weighted else k
    scale = k * (weight_scale if weighted else 1)
    sign_sums = [np.rint(np.asarray(a, dtype=np.float64) * scale) for a in mean[num_arrays : 2 * num_arrays]]
    if any(np.abs(s).max(initial=0) > normaliser for s in sign_sums):
        raise ValueError("decoded sign sum exceeds its normaliser: wrong K or encoding")
    factor = k * weight_scale * bound / total
    updates = [np.asarray(a, dtype=np.float64) * factor for a in mean[:num_arrays]]
    return {"update": updates, "sign_sum": sign_sums, "normaliser": normaliser, "total_examples": total,
            "clipped_fraction": float(mean[-1][1])}


class SecureGMA(LegacyFedAvg):
    """GMA (Tenison et al., TMLR 2023) with a fedgma server optimizer, on sums from Flower's SecAgg+.

    A legacy Flower ``Strategy`` for ``SecAggPlusWorkflow`` (run it with :func:`run_secure`); clients
    use :func:`fedgma_secaggplus_mod`. Sampling, ``on_fit_config_fn``, centralised ``evaluate_fn`` and
    federated evaluation are Flower's ``FedAvg``'s (legacy API; give ``initial_parameters``).

    Each round: θ ← opt.step(θ, −m ⊙ ū) with ū = Σ n_k clip(Δ_k, ±B) / Σ n_k (to the quantization
    error of :func:`update_error_bound`) and m = ``gma_mask(A, threshold, hard)``, A = |Σ s_k sign Δ_k| /
    Σ s_k computed from the exact integer sign sums (s_k = n_k with ``weighted_agreement``, else 1), so
    m is bit-identical to plaintext GMA's on the same updates. The aggregate is formed in float32 (float64
    if any array of the model is float64) and each array is returned in its own dtype.

    Args:
        threshold, hard, weighted_agreement: GMA's options (as ``fedgma.aggregation.gma``).
        optimizer, optimizer_options: a fedgma server optimizer (``sgd``, ``adam``, ``yogi``, ``adagrad``).
        update_bound: B, the per-coordinate clip of Δ_k before encoding (choose it above the typical update;
            ``secure-clipped-fraction`` in the fit metrics tells how many coordinates were clipped).
        max_examples: the largest ``num_examples`` a client may report (W is the next power of two).
        max_clients: the most clients a round may sample; sets the quantization range (must match
            :func:`secure_workflow`'s, which :func:`run_secure` ensures).
        **fedavg_options: Flower's legacy ``FedAvg`` arguments (``fraction_fit``, ``min_fit_clients``,
            ``initial_parameters``, ``evaluate_fn``, ``on_fit_config_fn``, ...).

    Raises:
        ValueError: bad options (checked at construction); TypeError: a model with non-float arrays.
    """

    def __init__(self, *, threshold: float = 0.4, hard: bool = False, weighted_agreement: bool = False,
                 optimizer: str = "sgd", optimizer_options: dict[str, Any] | None = None, update_bound: float = 1.0,
                 max_examples: int = 1 << 16, max_clients: int = 64, **fedavg_options: Any) -> None:
        super().__init__(**fedavg_options)
        gma_mask(torch.zeros(1), threshold)  # checks τ ∈ [0, 1]
        if not (update_bound > 0 and math.isfinite(update_bound)):
            raise ValueError(f"update_bound must be a finite number > 0, got {update_bound!r}")
        self.threshold = float(threshold)
        self.hard = bool(hard)
        self.weighted_agreement = bool(weighted_agreement)
        self.update_bound = float(update_bound)
        self.quantization_range = quantization_range_for(max_clients)
        self.max_clients = int(max_clients)
        self.weight_scale = weight_scale_for(max_examples, self.quantization_range)
        self.optimizer = make_server_optimizer(optimizer, **(optimizer_options or {}))
        self._global: list[np.ndarray] | None = None
        self._sampled = 0
        self.last_round: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (f"SecureGMA(threshold={self.threshold}, hard={self.hard}, "
                f"weighted_agreement={self.weighted_agreement}, update_bound={self.update_bound}, "
                f"weight_scale={self.weight_scale}, Q={self.quantization_range})")

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[Any, Any]]:
        """:meth:`sample_fit` (FedAvg's sampling by default); each FitIns config gets B, W and the agreement
        kind for the client mod.

        Raises:
            ValueError: more clients sampled than ``max_clients``.
        """
        self._global = parameters_to_ndarrays(parameters)
        _float_arrays(self._global, "the global model")
        pairs = self.sample_fit(server_round, parameters, client_manager)
        if len(pairs) > self.max_clients:
            raise ValueError(f"round {server_round} samples {len(pairs)} clients > max_clients={self.max_clients}")
        self._sampled = len(pairs)
        for _, fitins in pairs:
            fitins.config = {**fitins.config, BOUND_KEY: self.update_bound, WEIGHT_SCALE_KEY: self.weight_scale,
                             WEIGHTED_KEY: self.weighted_agreement}
        return pairs

    def sample_fit(self, server_round: int, parameters: Parameters, client_manager: Any
                   ) -> list[tuple[Any, Any]]:
        """The round's clients and their ``FitIns`` (``ClientProxy``, ``FitIns``): legacy FedAvg's
        ``configure_fit`` (random sampling, ``on_fit_config_fn``). Override it to choose the clients;
        :meth:`configure_fit` then adds the secure settings to every ``FitIns`` config."""
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        """Mask and step from the workflow's average (every result's ``parameters`` is that same average).

        Returns ``(None, {})`` (model unchanged) when there are no results, when the sum is not a valid
        encoding (a client sent a malformed vector: logged, and ``last_round["invalid_sum"]`` says why), or
        when the step would make the model non-finite. Metrics: ``gma-mask-density``, ``gma-agreement-mean``,
        ``secure-num-clients``,
        ``secure-num-dropped`` (sampled clients whose vector is not in the sum; flwr 1.41 lists each such
        client twice in ``failures``), ``secure-total-examples``, ``secure-clipped-fraction``,
        ``secure-update-error-bound`` (:func:`update_error_bound` of the round; a WARNING is logged when it
        is not below the mean update's RMS: ``update_bound`` far too large), plus
        ``fit_metrics_aggregation_fn`` of the clients' plaintext metrics, if given (note: those
        ``num_examples`` are all 1).
        """
        self.last_round = {"round": server_round, "num_clients": len(results), "num_failures": len(failures),
                           "num_dropped": self._sampled - len(results)}
        if not results or self._global is None:
            return None, {}
        try:
            sums = decode_aggregate(parameters_to_ndarrays(results[0][1].parameters), len(results), self.update_bound,
                                    self.weight_scale, self.weighted_agreement)
        except ValueError as error:  # impossible sums: some client sent a vector outside the encoding
            log(WARNING, "SecureGMA: round %d skipped, model unchanged: the secure sum is not a valid encoding "
                "(%s); a client sent a malformed vector (the sum cannot say which)", server_round, error)
            self.last_round["invalid_sum"] = str(error)
            return None, {}
        dtype = torch.float64 if any(a.dtype == np.float64 for a in self._global) else torch.float32
        params = torch.cat([torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).ravel() for a in self._global])
        update = torch.cat([torch.from_numpy(a).ravel() for a in sums["update"]])
        sign_sum = torch.cat([torch.from_numpy(a).ravel() for a in sums["sign_sum"]]).to(dtype)
        error_bound = update_error_bound(self.update_bound, self.weight_scale, len(results), sums["total_examples"],
                                         self.quantization_range)
        rms = float(update.square().mean().sqrt()) if update.numel() else 0.0
        if error_bound >= rms and bool(sign_sum.any()):
            # B far above the updates: each client's (n_k/W)·Δ/B is below Flower's quantization step (or below
            # float64's resolution next to 1), so the sum is all quantization noise, or exactly zero
            log(WARNING, "SecureGMA: round %d: quantization error bound %.3g per coordinate ≥ the mean update's RMS "
                "%.3g: update_bound = %g is too large for these updates (choose it just above the largest update "
                "coordinate)", server_round, error_bound, rms, self.update_bound)
        agreement = sign_agreement(sign_sum, float(sums["normaliser"]))
        mask = gma_mask(agreement, self.threshold, self.hard)
        aggregate = update.to(dtype) * mask
        new = self.optimizer.step(params.to(dtype), -aggregate)
        self.last_round.update(mask=mask, agreement=agreement, aggregate=aggregate, sums=sums,
                               update_error_bound=error_bound)
        if not torch.isfinite(new).all():
            log(WARNING, "SecureGMA: round %d would make the model non-finite; model unchanged", server_round)
            return None, {}
        arrays, start = [], 0
        for a in self._global:
            arrays.append(new[start : start + a.size].numpy().astype(a.dtype).reshape(a.shape))
            start += a.size
        metrics: dict[str, Any] = {}
        if self.fit_metrics_aggregation_fn:
            metrics.update(self.fit_metrics_aggregation_fn([(r.num_examples, r.metrics) for _, r in results]))
        metrics.update({"gma-mask-density": float(mask.float().mean()),
                        "gma-agreement-mean": float(agreement.float().mean()),
                        "secure-num-clients": len(results), "secure-num-dropped": self._sampled - len(results),
                        "secure-total-examples": sums["total_examples"],
                        "secure-clipped-fraction": sums["clipped_fraction"],
                        "secure-update-error-bound": error_bound})
        return ndarrays_to_parameters(arrays), metrics


def secure_workflow(strategy: SecureGMA, num_shares: int | float = 1.0, reconstruction_threshold: int | float = 0.6,
                    timeout: float | None = None) -> Any:
    """Flower's ``DefaultWorkflow`` whose fit workflow is ``SecAggPlusWorkflow`` set up for ``strategy``.

    ``max_weight = 1`` (every client reports weight 1), ``clipping_range = 1``, ``quantization_range =
    strategy.quantization_range``, ``modulus_range = 2^32``. ``num_shares``, ``reconstruction_threshold``
    and ``timeout`` are SecAgg+'s (see ``SecAggPlusWorkflow``): the defaults share each key with every
    sampled client and need 60 % of the shares, so a round survives the loss of up to 40 % of them.
    """
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    fit = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=reconstruction_threshold,
                             max_weight=1.0, clipping_range=CLIPPING_RANGE,
                             quantization_range=strategy.quantization_range, modulus_range=MODULUS, timeout=timeout)
    return DefaultWorkflow(fit_workflow=fit)


def run_secure(grid: Any, context: Context, strategy: SecureGMA, num_rounds: int, **workflow_options: Any) -> Any:
    """Run ``num_rounds`` of secure GMA from a ``ServerApp``'s main; returns the ``LegacyContext`` (its ``history``).

    ``workflow_options`` go to :func:`secure_workflow`.
    """
    from flwr.server import LegacyContext, ServerConfig

    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
    secure_workflow(strategy, **workflow_options)(grid, legacy)
    return legacy
