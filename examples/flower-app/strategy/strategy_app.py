"""Your own Flower app with fedgma's strategy: a ServerApp and a ClientApp for a small PyTorch model.

This is the example of docs/FLOWER.md, section 1: an ordinary Flower 1.41 app (your model, your
data, your training loop) whose ServerApp uses :class:`fedgma.flower.FedgmaStrategy`, so the
server's round is fedgma's (checked replies, a registered aggregator, fedgma's server optimizer).

Run it on Flower's simulation runtime (from the repository root, fedgma installed)::

    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run examples/flower-app/strategy --stream \\
        --federation-config "num-supernodes=5" --run-config "num-server-rounds=3 aggregator='mean'"

``tests/flower/test_examples.py`` runs this module's ``server_app`` and ``client_app`` on the same
runtime and checks the accuracy it reaches. The data are scikit-learn's digits (1,797 8×8 images),
split into ``num-partitions`` IID shards; each SuperNode trains on shard ``partition-id``.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from sklearn.datasets import load_digits
from torch import nn

from fedgma.flower import FedgmaStrategy

# ------------------------------------------------------------------ model and data (yours)


def make_model() -> nn.Module:
    """An MLP for 8×8 digits: float32 input [B, 64], logits [B, 10]."""
    torch.manual_seed(0)  # the same initial model on every process
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def load_partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard ``partition_id`` of the first 1,500 digits (x float32 [n, 64] in [0, 1], y int64 [n])."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(1500)
    shard = np.array_split(order, num_partitions)[partition_id]
    return torch.tensor(x[shard] / 16.0, dtype=torch.float32), torch.tensor(y[shard])


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The last 297 digits, held out for the server's evaluation."""
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[1500:] / 16.0, dtype=torch.float32), torch.tensor(y[1500:])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ------------------------------------------------------------------ ClientApp (yours, unchanged by fedgma)

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD from the received model; reply with the trained model and ``num-examples``."""
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_partition(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    lr = float(msg.content["config"]["lr"])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
    losses = []
    for batch in torch.randperm(len(y), generator=generator).split(16):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    metrics = MetricRecord({"num-examples": len(y), "train_loss": float(np.mean(losses))})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


# ------------------------------------------------------------------ ServerApp: FedgmaStrategy

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of the configured aggregator and server optimizer."""
    config = context.run_config
    strategy = FedgmaStrategy(
        aggregator=str(config["aggregator"]),                      # gma | mean | median | trimmed_mean | krum
        aggregator_options={"threshold": float(config["threshold"])} if config["aggregator"] == "gma" else {},
        optimizer=str(config["optimizer"]),                        # sgd | adam | yogi | adagrad
        optimizer_options={"lr": float(config["server-lr"])},
        fraction_train=float(config["fraction-train"]),           # Flower FedAvg's own options
        fraction_evaluate=0.0,                                     # evaluation is central (evaluate_fn)
        min_available_nodes=2,
    )
    test_x, test_y = load_test()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": accuracy(model, test_x, test_y)})

    result = strategy.start(grid, ArrayRecord(make_model().state_dict()),
                            num_rounds=int(config["num-server-rounds"]),
                            train_config=ConfigRecord({"lr": float(config["client-lr"])}), evaluate_fn=evaluate)
    accuracies = {r: float(m["accuracy"]) for r, m in result.evaluate_metrics_serverapp.items()}
    print("fedgma example: central test accuracy by round", accuracies)
    context.state["accuracy"] = MetricRecord({str(r): a for r, a in accuracies.items()})
