"""The round loop of a single-machine FL simulation.

One round: sample clients, train each locally from the global model, fold every update into the
aggregator, let the server optimizer apply the aggregate, and now and then evaluate. The run
folder receives the resolved config, one JSON line per round (``rounds.jsonl``) and per
evaluation (``metrics.jsonl``), and ``summary.json`` at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedgma.aggregation import make_aggregator
from fedgma.algorithms import make_client_algorithm, make_server_optimizer_for
from fedgma.backends import make_backend
from fedgma.client import LocalSGD, mean_train_loss
from fedgma.config import Config, config_to_toml
from fedgma.data.arrays import ArrayDataset
from fedgma.data.federated import FederatedDataset, build_federated, hold_out_validation
from fedgma.models import FlatModel, build_model
from fedgma.seeding import numpy_rng, torch_generator

__all__ = ["evaluate", "local_settings", "run", "sample_clients"]

TIMING_FIELDS = ("elapsed_s", "wall_s", "round_s")


def local_settings(config: Config) -> LocalSGD:
    c = config.client
    return LocalSGD(
        epochs=c.local_epochs,
        steps=c.local_steps,
        batch_size=c.batch_size,
        lr=c.lr,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
        prox_mu=c.prox_mu or 0.0,
    )


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of one round: ``per_round`` distinct ids, drawn from the round's own stream."""
    chosen = numpy_rng(seed, "sampling", round_index).choice(num_clients, size=per_round, replace=False)
    return sorted(int(c) for c in chosen)


@torch.no_grad()
def evaluate(model: FlatModel, params: Tensor, data: ArrayDataset, batch_size: int = 1000) -> dict[str, float]:
    """Loss and accuracy of ``params`` on ``data``, in batches."""
    model.load(params)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return {"loss": loss_sum / max(len(data), 1), "accuracy": correct / max(len(data), 1)}


def _evaluate_all(model: FlatModel, params: Tensor, data: FederatedDataset) -> dict[str, float]:
    result = evaluate(model, params, data.test)
    metrics = {"test_accuracy": result["accuracy"], "test_loss": result["loss"]}
    for name, extra in data.extra_tests.items():
        extra_result = evaluate(model, params, extra)
        metrics[f"{name}_accuracy"] = extra_result["accuracy"]
        metrics[f"{name}_loss"] = extra_result["loss"]
    return metrics


def _scalar_stats(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k != "mask" and k != "num_clients"}


class _JsonLines:
    def __init__(self, path: Path) -> None:
        self.handle = open(path, "w", buffering=1)  # noqa: SIM115  (closed by close(), lines flushed as written)

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.handle.close()


def run(config: Config, run_dir: str | Path, progress: bool = True, data: FederatedDataset | None = None) -> dict:
    """Run the experiment ``config`` (already resolved) and write its run folder; return the summary."""
    start_time = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config_to_toml(config))
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    seed = config.seed

    data = data or build_federated(config.data, seed)
    if config.data.validation_fraction and "validation" not in data.extra_tests:
        data = hold_out_validation(data, config.data.validation_fraction, seed)  # reported as validation_*
    (run_dir / "partition.json").write_text(json.dumps(data.statistics))
    data = data.to(device)
    module = build_model(config.model.name, data.input_shape, data.num_classes, torch_generator(seed, "init"))
    model = FlatModel(module, device)
    params = model.params.clone()

    settings = local_settings(config)
    client_algorithm = make_client_algorithm(config.algorithm, settings, model.numel, data.num_clients, device)
    server_optimizer = make_server_optimizer_for(config.algorithm, config.server)
    aggregator_options = config.server.model_dump()
    backend = make_backend(config.backend, model, data, settings, seed)

    metrics_log = _JsonLines(run_dir / "metrics.jsonl")
    rounds_log = _JsonLines(run_dir / "rounds.jsonl")
    total_steps = 0
    history: list[dict[str, Any]] = []
    last_round_stats: dict[str, Any] = {}
    bar = _progress(config.rounds, progress)
    try:
        for round_index in range(1, config.rounds + 1):
            round_start = time.perf_counter()
            sampled = sample_clients(seed, round_index, data.num_clients, config.server.clients_per_round)
            aggregator = make_aggregator(config.server.aggregator, layers=model.layers, **aggregator_options)
            client_algorithm.begin_round(params)
            results = []
            for result in backend.train(params, sampled, round_index, client_algorithm):
                client_algorithm.finish_client(result)
                aggregator.add(result.update, result.num_samples)
                total_steps += result.num_steps
                result.update = None  # type: ignore[assignment]  # folded in; free it now
                results.append(result)
            update, stats = aggregator.result()
            params = server_optimizer.step(params, -update)
            algorithm_stats = client_algorithm.end_round(results)
            if not bool(torch.isfinite(params).all()):
                raise FloatingPointError(
                    f"round {round_index}: the global model became non-finite; lower client.lr or server.lr"
                )

            last_round_stats = _scalar_stats(stats)
            round_record = {
                "round": round_index,
                "clients": sampled,
                "train_loss": mean_train_loss(results),
                "local_steps": sum(r.num_steps for r in results),
                "update_norm": float(update.norm()),
                **algorithm_stats,
                **last_round_stats,
                "round_s": time.perf_counter() - round_start,
            }
            rounds_log.write(round_record)

            if round_index % config.eval_every == 0 or round_index == config.rounds:
                record = {
                    "round": round_index,
                    **_evaluate_all(model, params, data),
                    "train_loss": round_record["train_loss"],
                    "total_local_steps": total_steps,
                    **{k: v for k, v in last_round_stats.items() if isinstance(v, float)},
                    "elapsed_s": time.perf_counter() - start_time,
                }
                metrics_log.write(record)
                history.append(record)
                bar.update(round_index, record)
            else:
                bar.update(round_index)
    finally:
        backend.close()
        bar.close()
        metrics_log.close()
        rounds_log.close()

    summary = _summary(config, history, total_steps, time.perf_counter() - start_time)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    torch.save({"round": config.rounds, "params": params.cpu()}, run_dir / "final_model.pt")
    return summary


def _summary(config: Config, history: list[dict[str, Any]], total_steps: int, wall_s: float) -> dict[str, Any]:
    final = history[-1]
    best = max(history, key=lambda r: r["test_accuracy"])
    accuracy_keys = [k for k in final if k.endswith("_accuracy")]
    return {
        "name": config.name,
        "algorithm": config.algorithm,
        "aggregator": config.server.aggregator,
        "seed": config.seed,
        "rounds": config.rounds,
        "final": {k: final[k] for k in ["round", *accuracy_keys, "test_loss", "train_loss"] if k in final},
        "best": {"round": best["round"], "test_accuracy": best["test_accuracy"]},
        "total_local_steps": total_steps,
        "wall_s": wall_s,
        "status": "finished",
    }


class _progress:
    """A rich progress bar (silent when disabled or when output is not a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("round"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("rounds", total=total, status="")

    def update(self, round_index: int, record: dict[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        status = None
        if record is not None:
            status = f"test acc {record['test_accuracy']:.4f}  loss {record['test_loss']:.4f}"
        self.bar.update(self.task, completed=round_index, **({"status": status} if status else {}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

