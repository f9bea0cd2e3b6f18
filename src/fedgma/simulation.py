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

import functools
import inspect
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from fedgma.aggregation import Aggregator, make_aggregator
from fedgma.backends import make_backend
from fedgma.checkpoint import (
    FAILED,
    CheckpointError,
    RunFolderError,
    atomic_write,
    config_differences,
    final_files_problem,
    latest_checkpoint,
    list_checkpoints,
    lock_folder,
    read_json,
    save_checkpoint,
    truncate_jsonl,
)
from fedgma.client import ClientResult, LocalSGD, make_client_algorithm, mean_train_loss
from fedgma.config import Config, ConfigError, config_to_toml
from fedgma.data.federated import FederatedDataset, build_federated, hold_out_validation
from fedgma.evaluation import evaluate, evaluate_all  # re-exported: simulation.evaluate, simulation.evaluate_all
from fedgma.faults import NO_REPLY, attack_update, label_flip_clients, poison_labels, round_faults
from fedgma.models import FlatModel, build_model
from fedgma.plots import write_partition_files
from fedgma.progress import ProgressBar  # re-exported: simulation.ProgressBar
from fedgma.registry import AGGREGATORS
from fedgma.robust import with_clipping
from fedgma.round import BadUpdateError, ReplyPolicy, ServerState, run_round
from fedgma.seeding import numpy_rng, torch_generator
from fedgma.server_opt import make_server_optimizer

__all__ = [
    "BadUpdateError", "ProgressBar", "aggregator_factory",
    "aggregator_maker", "build_state", "check_device", "evaluate", "evaluate_all",
    "local_settings", "reply_policy", "run", "sample_clients", "summarize",
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


def _scalar_stats(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k != "mask" and k != "num_clients"}


class _JsonLines:
    """An append-only JSON-lines log: each record goes out in one ``write`` call on an ``O_APPEND`` file,
    so a kill leaves whole lines (a torn last line, if any, is dropped by ``truncate_jsonl`` on resume)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        os.close(self.fd)


def build_state(config: Config, model: FlatModel, num_clients: int, run_dir: Path | None = None) -> ServerState:
    """The state before round 1: the initial model and fresh server optimizer and client algorithm."""
    client = config.client.algorithm
    client_algorithm = make_client_algorithm(
        client.name, local_settings(config), client.options, numel=model.numel, num_clients=num_clients,
        device=model.params.device, spill_dir=None if run_dir is None else str(run_dir / "controls"),
    )
    server_optimizer = make_server_optimizer(config.server.optimizer.name, **config.server.optimizer.options)
    return ServerState(0, model.params.clone(), server_optimizer, client_algorithm)


def aggregator_factory(config: Config, model: FlatModel) -> Callable[..., Aggregator]:
    """A maker of fresh aggregators for each round: ``[server.aggregator]``, behind ``server.clip_norm``.

    See :func:`aggregator_maker`; the seed is the run's.
    """
    part = config.server.aggregator
    return aggregator_maker(part.name, part.options, model.layers, config.server.clip_norm, config.seed)


def aggregator_maker(name: str, options: dict[str, Any], layers: Any, clip_norm: float | None, seed: int
                     ) -> Callable[..., Aggregator]:
    """``make(round_index=0)``: a fresh aggregator ``name`` with ``options`` for one round, behind clipping.

    A rule whose factory takes a ``generator`` (e.g. ``gma_random_mask``) gets
    ``torch_generator(seed, "aggregation", round_index)``, so its randomness is set by the seed and the
    round (a resumed run draws the same); the other rules get only ``layers`` and ``check_finite``.

    Raises:
        ValueError: an unknown rule or a bad option, at once (not in round 1).
    """
    make_aggregator(name, layers=layers, **options)  # fail now, not in round 1
    random = "generator" in inspect.signature(AGGREGATORS.entry(name).factory).parameters

    def make(round_index: int = 0) -> Aggregator:
        context = {"generator": torch_generator(seed, "aggregation", round_index)} if random else {}
        return with_clipping(AGGREGATORS.build(name, options, layers=layers, **context), clip_norm)

    return make


def reply_policy(config: Config, model: FlatModel) -> ReplyPolicy:
    s = config.server
    return ReplyPolicy(model.numel, s.max_update_norm, s.on_bad_update, s.min_clients)


def run(
    config: Config,
    run_dir: str | Path,
    progress: bool = True,
    data: FederatedDataset | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run the experiment ``config`` (already resolved) and write its run folder; return the summary.

    With ``resume``, continue from the newest good checkpoint in ``run_dir``; the logs are cut back to
    that round first, so they end up identical (timing fields aside) to those of an uninterrupted run.
    A finished run (whole ``summary.json`` and ``final_model.pt``) just returns its summary; a damaged
    one (a file truncated by a kill or a full disk) is rebuilt from its last checkpoint, with a
    warning naming the damaged file.

    The folder is locked for the run's life: a second writer gets :class:`~fedgma.checkpoint.FolderInUseError`.
    Without ``resume``, a folder holding the checkpoints or the finished results of another config
    is refused with :class:`~fedgma.checkpoint.RunFolderError` unless ``overwrite``; a CUDA device that
    this torch cannot use is a :class:`~fedgma.config.ConfigError` before anything is written.
    """
    check_device(config.device)
    run_dir = Path(run_dir)
    with lock_folder(run_dir, "run"):
        return _run(config, run_dir, progress, data, resume, overwrite)


def check_device(device: str) -> None:
    """Refuse, in one line, a ``cuda``/``mps`` device this torch build or machine does not have (``ConfigError``)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device': {device!r}, but this torch has no usable CUDA "
                              "(torch.cuda.is_available() is False); use --device cpu or install a CUDA build of torch")
        index = int(device.split(":", 1)[1]) if ":" in device and device.split(":", 1)[1].isdigit() else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"config key 'device': {device!r}, but only {torch.cuda.device_count()} CUDA "
                              "device(s) are visible; use cuda:0 .. cuda:N-1")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("config key 'device': 'mps' is not available on this machine; use --device cpu")


def _run(config: Config, run_dir: Path, progress: bool, data: FederatedDataset | None, resume: bool,
         overwrite: bool) -> dict:
    start_time = time.perf_counter()
    if resume and (run_dir / "summary.json").is_file():
        problem = final_files_problem(run_dir)
        if problem is None:
            return read_json(run_dir / "summary.json")
        warnings.warn(f"{problem}: rebuilding the final files from the last checkpoint", RuntimeWarning,
                      stacklevel=3)
        (run_dir / "summary.json").unlink()
    if not resume and not overwrite:
        _refuse_another_config(run_dir, config)
    checkpoint = _find_checkpoint(run_dir, config) if resume else None
    if checkpoint is None:
        _clear_run(run_dir)
    atomic_write(run_dir / "config.toml", config_to_toml(config).encode())
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    seed = config.seed

    # -- build: data, model, parts, state -------------------------------------------------------
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
    state = build_state(config, model, data.num_clients, run_dir)
    new_aggregator = aggregator_factory(config, model)
    policy = reply_policy(config, model)
    backend = make_backend(config.backend.name, model, data, local_settings(config), seed, **config.backend.options)

    run_blocks = getattr(backend, "evaluate_blocks", None)  # a backend with workers evaluates in them
    initial = evaluate_all(model, state.params, data, run_blocks)  # the untrained model, for "improves over the start"
    if checkpoint is not None:
        state.load_state_dict(checkpoint)
        torch.set_rng_state(checkpoint["torch_rng_state"])
    history = truncate_jsonl(run_dir / "metrics.jsonl", state.round)  # drop what the killed run wrote after
    truncate_jsonl(run_dir / "rounds.jsonl", state.round)
    metrics_log = _JsonLines(run_dir / "metrics.jsonl")
    rounds_log = _JsonLines(run_dir / "rounds.jsonl")
    bar = ProgressBar(config.rounds, progress,
                      run_dir / "tensorboard" if getattr(config, "tensorboard", False) else None)
    bar.update(state.round)
    checkpoint_s = 0.0
    try:
        for round_index in range(state.round + 1, config.rounds + 1):
            # -- sample, train, check, aggregate, server step ----------------------------------
            round_start = time.perf_counter()
            sampled = sample_clients(seed, round_index, data.num_clients, config.server.clients_per_round)
            faults = round_faults(config.faults, seed, round_index, sampled)
            no_reply = {c: NO_REPLY[kind] for c, kind in faults.items() if kind in NO_REPLY}  # never reply
            replies = backend.train(state.params, [c for c in sampled if c not in no_reply], round_index,
                                    state.client_algorithm)
            if faults:
                replies = _with_attacks(replies, faults, config.faults.scale_factor)
            state, outcome = run_round(state, round_index, replies, functools.partial(new_aggregator, round_index),
                                       policy, dropped=no_reply)

            # -- log, evaluate, checkpoint ------------------------------------------------------
            round_stats = _scalar_stats(outcome.stats)
            round_record = {
                "round": round_index,
                "clients": sampled,
                "train_loss": mean_train_loss(outcome.accepted),
                "local_steps": sum(r.num_steps for r in outcome.accepted),
                "update_norm": float(outcome.update.norm()),
                **outcome.algorithm_stats,
                **round_stats,
                **({"faults": {str(c): kind for c, kind in faults.items()}} if faults else {}),
                **({"dropped": {str(c): why for c, why in sorted(outcome.dropped.items())}} if outcome.dropped else {}),
                "round_s": time.perf_counter() - round_start,
            }
            if round_index % config.eval_every == 0 or round_index == config.rounds:
                record = {
                    "round": round_index,
                    **evaluate_all(model, state.params, data, run_blocks),
                    "train_loss": round_record["train_loss"],
                    "total_local_steps": state.total_steps,
                    **{k: v for k, v in round_stats.items() if isinstance(v, float)},
                    "elapsed_s": time.perf_counter() - start_time,
                }
                metrics_log.write(record)
                history.append(record)
                bar.update(round_index, record)
            else:
                bar.update(round_index)
            bar.log_round(round_record)  # TensorBoard, when on
            rounds_log.write(round_record)  # before the checkpoint: a resume cuts the logs back to its round
            if config.checkpoint_every and (round_index % config.checkpoint_every == 0 or round_index == config.rounds):
                checkpoint_start = time.perf_counter()
                save_checkpoint(run_dir, round_index, {
                    "config": config_to_toml(config),
                    **state.state_dict(),
                    "torch_rng_state": torch.get_rng_state(),  # unused by fedgma's own streams; kept for exactness
                })
                checkpoint_s += time.perf_counter() - checkpoint_start
    finally:
        backend.close()
        bar.close()
        metrics_log.close()
        rounds_log.close()

    summary = summarize(config, history, state.total_steps, time.perf_counter() - start_time)
    summary["initial"] = initial
    summary["checkpoint_s"] = checkpoint_s  # time spent writing checkpoints (this process only, if resumed)
    model_bytes = io.BytesIO()
    torch.save({"round": config.rounds, "params": state.params.cpu()}, model_bytes)
    atomic_write(run_dir / "final_model.pt", model_bytes.getvalue())
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2).encode())  # last: the "finished" mark
    shutil.rmtree(run_dir / "controls", ignore_errors=True)  # finished: no checkpoint will be resumed
    return summary


def _with_attacks(replies: Iterable[ClientResult], faults: dict[int, str], scale_factor: float
                  ) -> Iterator[ClientResult]:
    """The replies with ``[faults]`` applied: a faulty client sends NaN, −Δ or a scaled Δ instead."""
    for result in replies:
        yield attack_update(result, faults[result.client_id], scale_factor) if result.client_id in faults else result


def _refuse_another_config(run_dir: Path, config: Config) -> None:
    """A fresh start must not silently replace the results or checkpoints of another config."""
    saved = run_dir / "config.toml"
    if not saved.is_file():
        return
    finished = (run_dir / "summary.json").is_file()
    if not finished and not list_checkpoints(run_dir):
        return
    differing = config_differences(config, saved)
    if differing:
        what = "a finished run" if finished else "an unfinished run (with checkpoints)"
        raise RunFolderError(
            f"{run_dir} holds {what} of another config ({'; '.join(differing[:3])}); "
            "use another --out, or --overwrite to replace it"
        )


def _clear_run(run_dir: Path) -> None:
    """A fresh start: remove the summary (first: the folder stops counting as finished), final model,
    checkpoints and logs a previous run in this folder left."""
    (run_dir / "summary.json").unlink(missing_ok=True)
    (run_dir / "final_model.pt").unlink(missing_ok=True)
    for _, path in list_checkpoints(run_dir):
        path.unlink()
    shutil.rmtree(run_dir / "controls", ignore_errors=True)  # SCAFFOLD's spilled c_i of an earlier run
    for name in ("metrics.jsonl", "rounds.jsonl", FAILED):  # FAILED: an earlier attempt's failure
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
    """``summary.json`` of a run from its evaluations: the final accuracies, the protocol's metric and the cost.

    ``final`` is the last evaluation; ``last_20pct`` the mean of each accuracy over the evaluations in the
    last 20% of the rounds (:func:`fedgma.report.protocol.last_fraction_mean`; absent when none falls in
    that window); ``best`` exists only with a validation split and is the evaluation where
    ``validation_accuracy`` was highest (its round, validation and test accuracy): a best chosen on the
    test set would overstate the method (issue 15), so there is none.
    """
    from fedgma.report.protocol import LAST_FRACTION, best_on_validation, last_fraction_mean

    final = history[-1]
    accuracy_keys = [k for k in final if k.endswith("_accuracy")]
    summary = {
        "name": config.name,
        "algorithm": config.algorithm,
        "aggregator": config.server.aggregator.name,
        "seed": config.seed,
        "rounds": config.rounds,
        "final": {k: final[k] for k in ["round", *accuracy_keys, "test_loss", "train_loss"] if k in final},
    }
    last = {}
    for key in accuracy_keys:
        try:
            last[key] = last_fraction_mean(history, key, horizon=config.rounds, fraction=LAST_FRACTION)
        except ValueError:  # no evaluation of this key in the window (eval_every larger than 20% of rounds)
            continue
    if last:
        summary["last_20pct"] = last
    best = best_on_validation(history)
    if best is not None:
        summary["best"] = {"round": best["round"], "validation_accuracy": best["validation_accuracy"],
                           "test_accuracy": best["test_accuracy"]}
    return {**summary, "total_local_steps": total_steps, "wall_s": wall_s, "status": "finished"}
