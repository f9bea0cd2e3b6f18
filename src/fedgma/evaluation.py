"""Evaluation of the global model: loss and accuracy on the test sets, in blocks a backend may spread.

Every evaluated set is cut into blocks of :data:`BLOCK` samples; a block's result is the sum of its
cross-entropy losses (float32, as ``F.cross_entropy(reduction="sum")`` gives it) and its count of
correct predictions. A set's loss is the float64 sum of its blocks' sums in block order, divided by
its size, so the result has the same bits wherever the blocks were computed, provided each block's
logits do (same model, same thread count). Within a block the forward pass runs in chunks of
:data:`FORWARD_CHUNK` samples: on a CPU a convolution over 1,000 images at once spills the caches
(``python benchmarks/bench.py --parts eval``: the FedAvg CNN on 15,999 Fashion-MNIST images, 7.1 s
at once, 6.2 s in chunks, one thread). At one thread a sample's logits do not depend on the chunk it
is in (tests/test_evaluation.py checks every registered model on the 8×8 digits images; the benchmark
checks the MLP and the CNN on Fashion-MNIST), so the metrics have the bits of the earlier one-pass
evaluation. With several threads the kernels may split the work by batch size, and the logits may
then differ from one pass in their last bits, as they already differ between thread counts.

A backend that trains in other processes can evaluate too: :func:`evaluate_all` hands the blocks
to ``run_blocks`` (the multiprocess backend's :meth:`~fedgma.multiprocess.MultiprocessBackend.evaluate_blocks`),
which returns their results in order; the parent only adds them up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fedgma.data.arrays import ArrayDataset
from fedgma.data.federated import FederatedDataset
from fedgma.models import FlatModel

__all__ = ["BLOCK", "FORWARD_CHUNK", "Block", "BlockResult", "blocks_of", "evaluate", "evaluate_all",
           "evaluate_blocks", "evaluation_set", "evaluation_sets"]

BLOCK = 1000  # samples per block: the unit of the loss sum and of the work a backend spreads
FORWARD_CHUNK = 100  # samples per forward pass within a block


class Block(NamedTuple):
    """Samples ``start:stop`` of the evaluation set named ``name`` (see :func:`evaluation_set`)."""

    name: str
    start: int
    stop: int


class BlockResult(NamedTuple):
    """A block's summed cross-entropy loss (a Python float of the float32 sum) and correct predictions."""

    loss_sum: float
    correct: int


def evaluation_sets(data: FederatedDataset) -> dict[str, ArrayDataset]:
    """Every set a run evaluates, by the name its blocks carry, in the order of the metrics: ``"test"``,
    ``"extra/<key of data.extra_tests>"``, ``"holdout/<index>"``."""
    return {"test": data.test, **{f"extra/{k}": v for k, v in data.extra_tests.items()},
            **{f"holdout/{i}": c for i, c in enumerate(data.holdout_clients)}}


def evaluation_set(data: FederatedDataset, name: str) -> ArrayDataset:
    """The set a block names (see :func:`evaluation_sets`).

    Raises:
        KeyError: no such set in ``data``.
    """
    sets = evaluation_sets(data)
    if name not in sets:
        raise KeyError(f"no evaluation set {name!r}")
    return sets[name]


def blocks_of(name: str, size: int) -> list[Block]:
    """The blocks of a set of ``size`` samples: ``BLOCK`` samples each, the last one shorter."""
    return [Block(name, start, min(start + BLOCK, size)) for start in range(0, size, BLOCK)]


@torch.no_grad()
def _block_result(model: FlatModel, data: ArrayDataset, start: int, stop: int) -> BlockResult:
    x, y = data.x[start:stop], data.y[start:stop]
    logits = torch.cat([model(x[i : i + FORWARD_CHUNK]) for i in range(0, len(x), FORWARD_CHUNK)])
    return BlockResult(float(F.cross_entropy(logits, y, reduction="sum")), int((logits.argmax(1) == y).sum()))


def evaluate_blocks(model: FlatModel, params: Tensor, data: FederatedDataset,
                    blocks: Sequence[Block]) -> list[BlockResult]:
    """Each block's result, in order, computed here with ``model`` loaded with ``params`` [d]."""
    model.load(params)
    return [_block_result(model, evaluation_set(data, b.name), b.start, b.stop) for b in blocks]


def _totals(results: Sequence[BlockResult], size: int) -> dict[str, float]:
    loss_sum, correct = 0.0, 0
    for result in results:  # in block order: the same float64 sum wherever the blocks ran
        loss_sum += result.loss_sum
        correct += result.correct
    return {"loss": loss_sum / max(size, 1), "accuracy": correct / max(size, 1)}


def evaluate(model: FlatModel, params: Tensor, data: ArrayDataset) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and ``accuracy`` (fraction in [0, 1]) of ``params`` [d] on ``data``.

    An empty set gives 0.0 for both.
    """
    model.load(params)
    results = [_block_result(model, data, b.start, b.stop) for b in blocks_of("", len(data))]
    return _totals(results, len(data))


RunBlocks = Callable[[Tensor, Sequence[Block]], Sequence[BlockResult]]


def evaluate_all(model: FlatModel, params: Tensor, data: FederatedDataset,
                 run_blocks: RunBlocks | None = None) -> dict[str, float]:
    """Every test metric of a run: the global test set, each extra test set, their OOD mean, held-out clients.

    ``test_*`` is in-distribution (for feature skew the test set is transformed like the training
    domains); ``extra_tests`` give ``<name>_accuracy`` and ``<name>_loss`` (the validation split is
    ``validation_*``); ``ood/<domain>_*`` are the held-out domains and ``ood_accuracy`` /
    ``ood_loss`` their mean; ``holdout_mean_accuracy`` and ``holdout_worst10_accuracy`` (mean over
    the worst 10% of the held-out clients, at least one; q-FFL's "worst 10%", Li et al. 2020) cover
    ``data.holdout_clients``. ``run_blocks(params, blocks)``, when given, computes the blocks'
    results (in order) instead of ``model``; the metrics have the same bits either way when its
    workers run the same model with the same thread count.
    """
    sets = evaluation_sets(data)
    blocks = {name: blocks_of(name, len(s)) for name, s in sets.items()}
    flat = [b for name in sets for b in blocks[name]]
    if run_blocks is None:
        results = evaluate_blocks(model, params, data, flat)
    else:
        results = list(run_blocks(params, flat))
        if len(results) != len(flat):
            raise RuntimeError(f"the backend evaluated {len(results)} blocks, expected {len(flat)}")
    per_set: dict[str, dict[str, float]] = {}
    at = 0
    for name, s in sets.items():
        per_set[name] = _totals(results[at : at + len(blocks[name])], len(s))
        at += len(blocks[name])

    metrics = {"test_accuracy": per_set["test"]["accuracy"], "test_loss": per_set["test"]["loss"]}
    ood = []
    for key in data.extra_tests:
        result = per_set[f"extra/{key}"]
        metrics[f"{key}_accuracy"] = result["accuracy"]
        metrics[f"{key}_loss"] = result["loss"]
        if key.startswith("ood/"):
            ood.append(result)
    if ood:
        metrics["ood_accuracy"] = sum(r["accuracy"] for r in ood) / len(ood)
        metrics["ood_loss"] = sum(r["loss"] for r in ood) / len(ood)
    if data.holdout_clients:
        accuracies = sorted(per_set[f"holdout/{i}"]["accuracy"] for i in range(len(data.holdout_clients)))
        worst = accuracies[: max(1, len(accuracies) // 10)]
        metrics["holdout_mean_accuracy"] = sum(accuracies) / len(accuracies)
        metrics["holdout_worst10_accuracy"] = sum(worst) / len(worst)
    return metrics
