"""GMA under SecAgg+ (fedgma.flower.secure) against plaintext GMA on Fashion-MNIST: mask agreement, error, cost.

Two trajectories from the same config and seed (configs/quickstart.toml with GMA's weighted agreement):

* plaintext: ``fedgma.round.run_round`` with GMA (``weighted_agreement = true``), as ``fedgma run``;
* secure: each client's update encoded by ``encode_update`` (the client mod's encoding), quantized by
  Flower's own ``quantize`` exactly as ``secaggplus_mod`` does with weight 1, summed, and dequantized
  with ``SecAggPlusWorkflow.unmask_stage``'s arithmetic (SecAgg+'s masks cancel exactly modulo 2^32,
  so the unmasked sum is this sum), then ``SecureGMA.aggregate_fit`` masks and steps.

Each secure round is also compared with plaintext GMA on the *same* updates: fraction of mask
coordinates equal, max |aggregate difference| and the bound ``update_error_bound``. Bytes per client
are the serialized masked vectors (int64 after Flower adds its masks, as sent), against the plaintext
float32 model and Flower's SecAgg+ of the model alone. Times: client-side encode + quantize and
server-side decode + mask + step per round, against plaintext aggregation + step. The key agreement
and share exchange of SecAgg+ are not in these times (see docs/PRIVACY.md for the runtime figure).

    python benchmarks/secure_agg.py --rounds 20
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import torch
from flwr.common import ndarray_to_bytes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract, parameters_addition
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedgma.aggregation import gma
from fedgma.backends import make_backend
from fedgma.config import load_config
from fedgma.data.federated import build_federated
from fedgma.flower.secure import SecureGMA, encode_update, update_error_bound
from fedgma.models import FlatModel, build_model
from fedgma.round import run_round
from fedgma.seeding import torch_generator
from fedgma.simulation import (
    aggregator_factory,
    build_state,
    evaluate_all,
    local_settings,
    reply_policy,
    sample_clients,
)


def secagg_mean(vectors: list[list[np.ndarray]], q: int) -> tuple[list[np.ndarray], float]:
    """Flower's weight-1 SecAgg+ arithmetic without the (cancelling) masks; returns the mean and client seconds."""
    total, client_s = None, 0.0
    for x in vectors:
        start = time.perf_counter()
        quantized = [a.astype(np.int64) for a in factor_combine(q, quantize(x, 1.0, q))]
        client_s += time.perf_counter() - start
        total = quantized if total is None else parameters_addition(total, quantized)
    q_total, recon = factor_extract(total)
    mean = dequantize(recon, 1.0, q)
    for vec in mean:
        vec += -(len(vectors) - 1) * 1.0
        vec *= q / q_total
    return mean, client_s


def payload_bytes(arrays: list[np.ndarray], q: int) -> int:
    """Bytes of the masked vector a client sends for ``arrays`` (int64 after the masks, as secaggplus_mod sends)."""
    rng = np.random.default_rng(0)
    quantized = factor_combine(q, quantize(arrays, 1.0, q))
    return sum(len(ndarray_to_bytes((a.astype(np.int64) + rng.integers(0, 1 << 32, a.shape)) % (1 << 32)))
               for a in quantized)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--bound", type=float, default=0.125, help="update bound B")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config("configs/quickstart.toml", [f"rounds={args.rounds}", f"seed={args.seed}",
                                                     "server.aggregator.weighted_agreement=true",
                                                     f"server.aggregator.threshold={args.threshold}"])
    data = build_federated(config.data, config.seed)
    per_round = config.server.clients_per_round
    max_examples = max(len(c) for c in data.clients)  # W: the next power of two (every client may be sampled)
    model = FlatModel(build_model(config.model.name, data.input_shape, data.num_classes,
                                  torch_generator(config.seed, "init")), torch.device("cpu"))
    plain = build_state(config, model, data.num_clients)
    secure = build_state(config, model, data.num_clients)
    backend = make_backend(config.backend.name, model, data, local_settings(config), config.seed,
                           **config.backend.options)
    new_aggregator, policy = aggregator_factory(config, model), reply_policy(config, model)
    strategy = None
    rows = []
    try:
        for r in range(1, config.rounds + 1):
            sampled = sample_clients(config.seed, r, data.num_clients, per_round)
            start = time.perf_counter()
            replies = list(backend.train(plain.params, sampled, r, plain.client_algorithm))
            train_plain_s = time.perf_counter() - start
            start = time.perf_counter()
            plain, _ = run_round(plain, r, iter(replies), functools.partial(new_aggregator, r), policy)
            plain_server_s = time.perf_counter() - start

            replies = list(backend.train(secure.params, sampled, r, secure.client_algorithm))
            if strategy is None:
                strategy = SecureGMA(threshold=args.threshold, weighted_agreement=True, update_bound=args.bound,
                                     max_examples=max_examples, max_clients=per_round)
                strategy.optimizer = secure.server_optimizer  # the recipe's server optimizer (fedavg: sgd, lr 1)
            theta = [secure.params.numpy().copy()]
            start = time.perf_counter()
            xs = [encode_update(theta, [(secure.params + x.update).numpy()], x.num_samples, args.bound,
                                strategy.weight_scale, True) for x in replies]
            encode_s = time.perf_counter() - start
            mean, quantize_s = secagg_mean(xs, strategy.quantization_range)
            start = time.perf_counter()
            strategy._global, strategy._sampled = theta, len(replies)
            fake = type("FitRes", (), {"parameters": ndarrays_to_parameters(mean), "num_examples": 1, "metrics": {}})
            params, metrics = strategy.aggregate_fit(r, [(None, fake())] * len(replies), [])
            secure_server_s = time.perf_counter() - start
            deltas = [torch.from_numpy((theta[0] + x.update.numpy()).astype(np.float64) - theta[0]).float()
                      for x in replies]
            expected, mask = gma(deltas, [x.num_samples for x in replies], threshold=args.threshold,
                                 weighted_agreement=True)
            error = float((strategy.last_round["aggregate"] - expected).abs().max())
            secure.params = torch.from_numpy(parameters_to_ndarrays(params)[0])
            row = {"round": r, "mask_equal": float((strategy.last_round["mask"] == mask).float().mean()),
                   "max_error": error, "bound": update_error_bound(args.bound, strategy.weight_scale, len(replies),
                                                                   sum(x.num_samples for x in replies),
                                                                   strategy.quantization_range),
                   "max_abs_update": max(float(x.update.abs().max()) for x in replies),
                   "clipped_fraction": metrics["secure-clipped-fraction"], "mask_density": metrics["gma-mask-density"],
                   "train_s": train_plain_s, "plain_server_s": plain_server_s,
                   "secure_client_s_per_client": (encode_s + quantize_s) / len(replies),
                   "secure_server_s": secure_server_s}
            if r % config.eval_every == 0 or r == config.rounds:
                row["plain_accuracy"] = evaluate_all(model, plain.params, data)["test_accuracy"]
                row["secure_accuracy"] = evaluate_all(model, secure.params, data)["test_accuracy"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        backend.close()
    d = secure.params.numel()
    q = strategy.quantization_range
    x = [np.zeros(d), np.zeros(d), np.zeros(2)]
    summary = {
        "d": d, "Q": q, "W": strategy.weight_scale, "B": args.bound, "clients_per_round": per_round,
        "mask_equal_min": min(r["mask_equal"] for r in rows), "max_error": max(r["max_error"] for r in rows),
        "max_bound": max(r["bound"] for r in rows), "max_abs_update": max(r["max_abs_update"] for r in rows),
        "clipped_fraction_max": max(r["clipped_fraction"] for r in rows),
        "final_plain_accuracy": rows[-1]["plain_accuracy"], "final_secure_accuracy": rows[-1]["secure_accuracy"],
        "bytes_plaintext_float32_model": len(ndarray_to_bytes(np.zeros(d, np.float32))),
        "bytes_secagg_model_only": payload_bytes([np.zeros(d)], q),
        "bytes_secure_gma": payload_bytes(x, q),
        "mean_plain_server_s": float(np.mean([r["plain_server_s"] for r in rows])),
        "mean_secure_server_s": float(np.mean([r["secure_server_s"] for r in rows])),
        "mean_secure_client_s": float(np.mean([r["secure_client_s_per_client"] for r in rows])),
        "mean_train_s_per_round": float(np.mean([r["train_s"] for r in rows])),
    }
    print(json.dumps(summary, indent=1))


def runtime(rounds: int, nodes: int, d: int) -> None:
    """Seconds per round on Flower's simulation runtime: the whole SecAgg+ protocol vs the plaintext legacy workflow.

    Clients return θ + a fixed pseudo-random update of d float32 values (no training), so the difference
    is the protocol: key agreement, share exchange, masking, quantization and unmasking. The first round
    (Ray's actors starting) is left out of the mean.
    """
    import logging
    import os

    from flwr.app import Context, RecordDict
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod  # noqa: F401  (documentation: what fedgma's mod wraps)
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedgma.flower.secure import fedgma_secaggplus_mod, secure_workflow

    class Client(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.update = (0.01 * np.random.default_rng(pid).standard_normal(d)).astype(np.float32)

        def fit(self, parameters, config):
            return [parameters[0] + self.update], 600, {}

    def timed(strategy_cls, secure: bool) -> list[float]:
        stamps: list[float] = []

        class Timed(strategy_cls):
            def configure_fit(self, server_round, parameters, client_manager):
                stamps.append(time.perf_counter())
                return super().configure_fit(server_round, parameters, client_manager)

        options = {"initial_parameters": ndarrays_to_parameters([np.zeros(d, np.float32)]),
                   "min_fit_clients": nodes, "min_available_clients": nodes, "fraction_evaluate": 0.0}
        strategy = Timed(max_clients=nodes, max_examples=1024, **options) if secure else Timed(**options)
        app = ServerApp()

        @app.main()
        def main(grid, context):
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
            (secure_workflow(strategy) if secure else DefaultWorkflow())(grid, legacy)
            stamps.append(time.perf_counter())

        client = ClientApp(client_fn=lambda c: Client(int(c.node_config["partition-id"])).to_client(),
                           mods=[fedgma_secaggplus_mod] if secure else [])
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        logging.getLogger("flwr").setLevel(logging.WARNING)
        _run_simulation(num_supernodes=nodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE, client_app=client,
                        server_app=app, backend_name="ray",
                        server_app_context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                   run_config={}),
                        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                        "init_args": {"num_cpus": 2, "log_to_driver": False,
                                                      "logging_level": "ERROR"}})
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]

    plain = timed(FedAvg, secure=False)
    secure = timed(SecureGMA, secure=True)
    print(json.dumps({"d": d, "nodes": nodes, "rounds": rounds, "plain_round_s": plain, "secure_round_s": secure,
                      "plain_mean_s_after_first": float(np.mean(plain[1:])),
                      "secure_mean_s_after_first": float(np.mean(secure[1:]))}, indent=1))


if __name__ == "__main__":
    import sys

    if "--runtime" in sys.argv:
        runtime(rounds=4, nodes=5, d=199210)
    else:
        main()
