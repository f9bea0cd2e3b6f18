"""The round loop of a single-machine FL simulation.

One round: sample clients, train each locally from the global model, check every reply and
fold the good ones into the aggregator, let the server optimizer apply the aggregate, now and then
evaluate, and checkpoint. The run folder receives the resolved config, one JSON line per round
(``rounds.jsonl``) and per evaluation (``metrics.jsonl``), checkpoints, and ``summary.json`` at the end.

Reliability: a reply that is not a finite update of the right shape (or whose norm exceeds
``server.max_update_norm``) stops the run naming the client and round (``server.on_bad_update =
"fail"``) or is dropped and logged (``"drop"``); a round with fewer than ``server.min_clients``
replies leaves the model unchanged; the global model is never written with a non-finite value.
``run(..., resume=True)`` continues from the newest good checkpoint and gives the same logs as an
uninterrupted run. ``[faults]`` injects crashes, stragglers, NaN and Byzantine replies
(:mod:`fedgma.faults`) to test all this.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedgma.aggregation import make_aggregator
from fedgma.algorithms import make_client_algorithm, make_server_optimizer_for
from fedgma.backends import make_backend
from fedgma.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, save_checkpoint, truncate_jsonl
from fedgma.client import LocalSGD, mean_train_loss
from fedgma.config import Config, config_to_toml
from fedgma.data.arrays import ArrayDataset
from fedgma.data.federated import FederatedDataset, build_federated, hold_out_validation
from fedgma.faults import NO_REPLY, attack_update, label_flip_clients, poison_labels, round_faults
from fedgma.models import FlatModel, build_model
from fedgma.plots import write_partition_files
from fedgma.robust import update_problem, with_clipping
from fedgma.seeding import numpy_rng, torch_generator

__all__ = [
    "BadUpdateError", "ProgressBar", "evaluate", "evaluate_all", "local_settings", "run", "sample_clients", "summarize",
]

log = logging.getLogger(__name__)


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


def evaluate_all(model: FlatModel, params: Tensor, data: FederatedDataset) -> dict[str, float]:
    """Every test metric of a run: the global test set, each extra test set, their OOD mean, held-out clients.

    ``test_*`` is in-distribution (for feature skew the test set is transformed like the training
    domains); ``ood/<domain>_*`` are the held-out domains and ``ood_accuracy`` / ``ood_loss`` their
    mean; ``holdout_mean_accuracy`` and ``holdout_worst10_accuracy`` (mean over the worst 10% of
    the held-out clients, at least one; q-FFL's "worst 10%", Li et al. 2020) cover
    ``data.holdout_clients``.
    """
    result = evaluate(model, params, data.test)
    metrics = {"test_accuracy": result["accuracy"], "test_loss": result["loss"]}
    ood = []
    for name, extra in data.extra_tests.items():
        extra_result = evaluate(model, params, extra)
        metrics[f"{name}_accuracy"] = extra_result["accuracy"]
        metrics[f"{name}_loss"] = extra_result["loss"]
        if name.startswith("ood/"):
            ood.append(extra_result)
    if ood:
        metrics["ood_accuracy"] = sum(r["accuracy"] for r in ood) / len(ood)
        metrics["ood_loss"] = sum(r["loss"] for r in ood) / len(ood)
    if data.holdout_clients:
        accuracies = sorted(evaluate(model, params, c)["accuracy"] for c in data.holdout_clients)
        worst = accuracies[: max(1, len(accuracies) // 10)]
        metrics["holdout_mean_accuracy"] = sum(accuracies) / len(accuracies)
        metrics["holdout_worst10_accuracy"] = sum(worst) / len(worst)
    return metrics


def _scalar_stats(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k != "mask" and k != "num_clients"}


class BadUpdateError(ValueError):
    """A client sent an unusable update and ``server.on_bad_update = "fail"``; names the client and round."""


class _JsonLines:
    def __init__(self, path: Path) -> None:
        self.handle = open(path, "a", buffering=1)  # noqa: SIM115  (closed by close(), lines flushed as written)

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.handle.close()


def run(
    config: Config,
    run_dir: str | Path,
    progress: bool = True,
    data: FederatedDataset | None = None,
    resume: bool = False,
) -> dict:
    """Run the experiment ``config`` (already resolved) and write its run folder; return the summary.

    With ``resume``, continue from the newest good checkpoint in ``run_dir`` (a finished run just
    returns its summary); the logs are cut back to that round first, so they end up identical
    (timing fields aside) to those of an uninterrupted run.
    """
    start_time = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    checkpoint = _find_checkpoint(run_dir, config) if resume else None
    if checkpoint is None:
        _clear_run(run_dir)
    (run_dir / "config.toml").write_text(config_to_toml(config))
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    seed = config.seed

    data = data or build_federated(config.data, seed)
    if config.data.validation_fraction and "validation" not in data.extra_tests:
        data = hold_out_validation(data, config.data.validation_fraction, seed)  # reported as validation_*
    write_partition_files(run_dir, data.statistics)  # partition.json, partition_heatmap.png, client_sizes.png
    poisoned = label_flip_clients(config.faults.label_flip, seed, data.num_clients)  # [faults] label_flip
    if poisoned:
        data = poison_labels(data, poisoned)
    data = data.to(device)
    module = build_model(config.model.name, data.input_shape, data.num_classes, torch_generator(seed, "init"))
    model = FlatModel(module, device)
    params = model.params.clone()

    settings = local_settings(config)
    client_algorithm = make_client_algorithm(
        config.algorithm, settings, model.numel, data.num_clients, device, state_memory_mb=config.scaffold_memory_mb
    )
    server_optimizer = make_server_optimizer_for(config.algorithm, config.server)
    aggregator_options = config.server.model_dump()
    backend = make_backend(
        config.backend, model, data, settings, seed, workers=config.workers, max_clients=config.vector_clients
    )

    total_steps = 0
    last_round_stats: dict[str, Any] = {}
    initial = evaluate_all(model, params, data)  # the untrained model, for "improves over the start"
    if checkpoint is not None:
        params = checkpoint["params"].to(device)
        server_optimizer.load_state_dict(_to_device(checkpoint["server_optimizer"], device))
        client_algorithm.load_state_dict(checkpoint["client_algorithm"])
        torch.set_rng_state(checkpoint["torch_rng_state"])
        total_steps = checkpoint["total_steps"]
    first_round = 1 if checkpoint is None else checkpoint["round"] + 1
    history = truncate_jsonl(run_dir / "metrics.jsonl", first_round - 1)  # drop what the killed run wrote after
    truncate_jsonl(run_dir / "rounds.jsonl", first_round - 1)
    metrics_log = _JsonLines(run_dir / "metrics.jsonl")
    rounds_log = _JsonLines(run_dir / "rounds.jsonl")
    bar = ProgressBar(config.rounds, progress)
    bar.update(first_round - 1)
    try:
        for round_index in range(first_round, config.rounds + 1):
            round_start = time.perf_counter()
            sampled = sample_clients(seed, round_index, data.num_clients, config.server.clients_per_round)
            faults = round_faults(config.faults, seed, round_index, sampled)
            dropped = {c: NO_REPLY[kind] for c, kind in faults.items() if kind in NO_REPLY}  # never reply
            aggregator = with_clipping(
                make_aggregator(config.server.aggregator, layers=model.layers, **aggregator_options),
                config.server.clip_norm,
            )
            client_algorithm.begin_round(params)
            results = []
            replying = [c for c in sampled if c not in dropped]
            for result in backend.train(params, replying, round_index, client_algorithm):
                total_steps += result.num_steps
                if result.client_id in faults:
                    result = attack_update(result, faults[result.client_id], config.faults.scale_factor)
                problem = update_problem(result.update, model.numel, config.server.max_update_norm)
                if problem is not None:
                    dropped[result.client_id] = _reject(problem, result.client_id, round_index, config)
                    continue
                client_algorithm.finish_client(result)
                aggregator.add(result.update, result.num_samples)
                result.update = None  # type: ignore[assignment]  # folded in; free it now
                results.append(result)
            if len(results) >= config.server.min_clients:
                update, stats = aggregator.result()
                params = _finite(server_optimizer.step(params, -update), round_index)
                algorithm_stats = client_algorithm.end_round(results)
            else:  # too few replies: the round is lost and the global model stays as it was
                log.warning("round %d: %d of %d clients replied (server.min_clients = %d); round skipped",
                            round_index, len(results), len(sampled), config.server.min_clients)
                update, stats, algorithm_stats = torch.zeros_like(params), {}, {"skipped": True}

            last_round_stats = _scalar_stats(stats)
            round_record = {
                "round": round_index,
                "clients": sampled,
                "train_loss": mean_train_loss(results),
                "local_steps": sum(r.num_steps for r in results),
                "update_norm": float(update.norm()),
                **algorithm_stats,
                **last_round_stats,
                **({"faults": {str(c): kind for c, kind in faults.items()}} if faults else {}),
                **({"dropped": {str(c): why for c, why in sorted(dropped.items())}} if dropped else {}),
                "round_s": time.perf_counter() - round_start,
            }
            rounds_log.write(round_record)

            if round_index % config.eval_every == 0 or round_index == config.rounds:
                record = {
                    "round": round_index,
                    **evaluate_all(model, params, data),
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

            if config.checkpoint_every and (round_index % config.checkpoint_every == 0 or round_index == config.rounds):
                save_checkpoint(run_dir, round_index, {
                    "round": round_index,
                    "config": config_to_toml(config),
                    "params": params.cpu(),
                    "server_optimizer": _to_device(server_optimizer.state_dict(), "cpu"),
                    "client_algorithm": _to_device(client_algorithm.state_dict(), "cpu"),
                    "torch_rng_state": torch.get_rng_state(),  # unused by fedgma's own streams; kept for exactness
                    "total_steps": total_steps,
                })
    finally:
        backend.close()
        bar.close()
        metrics_log.close()
        rounds_log.close()

    summary = summarize(config, history, total_steps, time.perf_counter() - start_time)
    summary["initial"] = initial
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    torch.save({"round": config.rounds, "params": params.cpu()}, run_dir / "final_model.pt")
    return summary


def _reject(problem: str, client_id: int, round_index: int, config: Config) -> str:
    """Apply ``server.on_bad_update`` to a bad reply: raise naming the client, or log and return the reason."""
    message = f"round {round_index}: client {client_id} {problem}"
    if config.server.on_bad_update == "fail":
        raise BadUpdateError(f"{message} (server.on_bad_update = 'fail'; set it to 'drop' to skip such clients)")
    log.warning("%s; dropped from the round (server.on_bad_update = 'drop')", message)
    return problem


def _finite(params: Tensor, round_index: int) -> Tensor:
    if not bool(torch.isfinite(params).all()):
        raise FloatingPointError(
            f"round {round_index}: the aggregate would make the global model non-finite; "
            "lower client.lr or server.lr, or set server.max_update_norm / server.clip_norm"
        )
    return params


def _to_device(state: Any, device: torch.device | str) -> Any:
    """A copy of a (nested) state dict with every tensor moved to ``device``."""
    if isinstance(state, Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_device(v, device) for v in state)
    return state


def _clear_run(run_dir: Path) -> None:
    """A fresh start: remove the checkpoints and summary a previous run in this folder left."""
    for _, path in list_checkpoints(run_dir):
        path.unlink()
    (run_dir / "summary.json").unlink(missing_ok=True)
    for name in ("metrics.jsonl", "rounds.jsonl"):
        (run_dir / name).unlink(missing_ok=True)


def _find_checkpoint(run_dir: Path, config: Config) -> dict[str, Any] | None:
    """The newest good checkpoint, checked to belong to ``config``; None (with a warning) when there is none."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        warnings.warn(f"{run_dir}: no usable checkpoint to resume from; starting at round 1", RuntimeWarning,
                      stacklevel=3)
        return None
    if checkpoint["config"] != config_to_toml(config):
        saved = set(checkpoint["config"].splitlines())
        differing = [line for line in config_to_toml(config).splitlines() if line not in saved]
        raise CheckpointError(
            f"{run_dir}: the checkpoint of round {checkpoint['round']} was written with another config "
            f"(differs in: {'; '.join(differing) or 'section layout'}); resume with the run's own config.toml"
        )
    return checkpoint


def summarize(config: Config, history: list[dict[str, Any]], total_steps: int, wall_s: float) -> dict[str, Any]:
    """``summary.json`` of a run from its evaluations: the final and best accuracies and the cost."""
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


class ProgressBar:
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

