"""The Flower app: records, the ClientApp's training step, and a 2-round run on Flower's simulation engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from click.testing import CliRunner  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402

from fedgma.cli import main  # noqa: E402
from fedgma.client import train_client  # noqa: E402
from fedgma.config import ConfigError, config_to_toml, load_config  # noqa: E402
from fedgma.flower.client_app import client_app  # noqa: E402
from fedgma.flower.records import params_to_record, record_to_params  # noqa: E402
from fedgma.flower.run_config import (  # noqa: E402
    EXPERIMENT_KEY,
    build_data,
    build_flat_model,
    check_supported,
    config_from_run_config,
)
from fedgma.seeding import torch_generator  # noqa: E402
from fedgma.simulation import local_settings  # noqa: E402
from fedgma.simulation import run as run_fedgma  # noqa: E402

pytestmark = pytest.mark.flower

CONFIG = """
seed = 3
rounds = 2
eval_every = 1
algorithm = "fedavg"
threads = 1

[data]
dataset = "digits"
partition = "dirichlet"
alpha = 0.5
num_clients = 6
min_size = 5

[model]
name = "mlp"

[client]
local_epochs = 1
batch_size = 16
lr = 0.05

[server]
aggregator = "gma"
threshold = 0.4
clients_per_round = 4
"""


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "digits.toml"
    path.write_text(CONFIG)
    return path


def test_fedgma_flower_app_keeps_its_entry_points_and_old_names():
    """Flower apps name ``fedgma.flower.app:server_app`` / ``:client_app``; every name of its ``__all__`` is the
    object of the module it moved to, so ``from fedgma.flower.app import run_flower, serve, ...`` keeps working."""
    from fedgma.flower import app, launch, records, run_config
    from fedgma.flower import client_app as client_module
    from fedgma.flower import server_app as server_module

    homes = [run_config, records, client_module, server_module, launch]
    for name in app.__all__:
        (home,) = [module for module in homes if name in module.__all__]
        assert getattr(app, name) is getattr(home, name), name
    assert app.client_app is client_app and app.server_app is server_module.server_app


def test_records_round_trip_and_mismatches_are_named(config_path):
    config = load_config(config_path)
    model = build_flat_model(config, build_data(config))
    params = torch.randn(model.numel, generator=torch.Generator().manual_seed(0))
    record = params_to_record(model, params)
    assert list(record) == [layer.name for layer in model.layers]
    assert tuple(record["1.weight"].shape) == (200, 64)
    assert torch.equal(record_to_params(record, model), params)
    del record["1.bias"]
    with pytest.raises(ValueError, match="do not match the model's parameters"):
        record_to_params(record, model)


def test_run_config_becomes_a_resolved_config_and_unsupported_settings_are_refused():
    config, own = config_from_run_config(
        {"rounds": 4, "data.dataset": "digits", "data.num_clients": 5, "server.clients_per_round": 2,
         "run-dir": "/tmp/x", "algorithm": "fedadam"}
    )
    assert (config.rounds, config.data.num_clients, own["run-dir"], own["round-timeout"]) == (4, 5, "/tmp/x", 600.0)
    assert config.server.optimizer.lr == 0.01  # the fedadam recipe's default, filled by resolve
    with pytest.raises(ConfigError, match="unknown config key 'data.datasett'"):
        config_from_run_config({"data.datasett": "digits"})
    check_supported(config_from_run_config({"data.dataset": "digits", "algorithm": "scaffold"})[0])  # runs on Flower
    with pytest.raises(ConfigError, match=r"\[faults\]"):
        check_supported(config_from_run_config({"data.dataset": "digits", "faults.crash": 0.5})[0])


def test_client_app_trains_exactly_like_train_client(config_path):
    """The ClientApp of the node with partition-id 2 returns θ + Δ of fedgma's own local training."""
    config = load_config(config_path)
    data = build_data(config)
    model = build_flat_model(config, data)
    theta = model.params.clone()
    content = RecordDict({
        "arrays": params_to_record(model, theta),
        "config": ConfigRecord({"server-round": 5, "client-id": 2, EXPERIMENT_KEY: config_to_toml(config)}),
    })
    message = Message(content, dst_node_id=99, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=99, node_config={"partition-id": 2, "num-partitions": 6},
                      state=RecordDict(), run_config={})
    reply = client_app(message, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    expected = train_client(model, theta, data.clients[2], local_settings(config),
                            torch_generator(config.seed, "client", 5, 2), client_id=2)
    assert metrics["num-examples"] == len(data.clients[2]) and metrics["client-id"] == 2
    assert metrics["num-steps"] == expected.num_steps
    assert torch.equal(record_to_params(reply.content["arrays"], model), theta + expected.update)

    wrong = Message(RecordDict({**content, "config": ConfigRecord({**content["config"], "client-id": 3})}),
                    dst_node_id=99, message_type=MessageType.TRAIN)
    with pytest.raises(ValueError, match="message for client 3 reached the node of client 2"):
        client_app(wrong, context)  # Flower's runtime turns this into an error reply


def test_engine_flower_matches_fedgma_engine_on_digits(config_path, tmp_path):
    """`fedgma run --engine flower` (Flower simulation, Ray) vs our engine: same run folder, same accuracy."""
    ours = run_fedgma(load_config(config_path), tmp_path / "ours", progress=False)
    result = CliRunner().invoke(main, ["run", str(config_path), "--engine", "flower", "--quiet",
                                       "--out", str(tmp_path / "flower")])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "flower"
    for name in ("config.toml", "partition.json", "rounds.jsonl", "metrics.jsonl", "summary.json", "final_model.pt"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["status"] == "finished"
    assert 'engine = "flower"' in (folder / "config.toml").read_text()
    theirs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    mine = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in theirs] == [r["round"] for r in mine] == [1, 2]
    for a, b in zip(mine, theirs, strict=True):
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.005, (a, b)
        assert a["total_local_steps"] == b["total_local_steps"]
        assert b["mask_density"] == pytest.approx(a["mask_density"], abs=1e-4)
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    ours_rounds = [json.loads(line) for line in (tmp_path / "ours" / "rounds.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds] == [r["clients"] for r in ours_rounds]  # same client sampling
    assert summary["final"]["test_accuracy"] > summary["initial"]["test_accuracy"]
    assert ours["final"]["test_accuracy"] == pytest.approx(summary["final"]["test_accuracy"], abs=0.005)


def test_serve_writes_final_files_atomically_and_holds_the_lock(config_path, tmp_path, monkeypatch):
    """The ServerApp (here in this process, on Flower's simulation runtime) locks the run folder for the run's
    life and writes config.toml, final_model.pt and summary.json (last) through checkpoint.atomic_write."""
    from flower_sim import simulate

    from fedgma.checkpoint import FolderInUseError, atomic_write, final_files_problem, lock_folder
    from fedgma.flower import server_app as server_module

    out = tmp_path / "served"
    written, locked = [], []

    def recording_write(path, data):
        written.append(Path(path).name)
        try:
            with lock_folder(out, "probe"):
                locked.append(False)
        except FolderInUseError:
            locked.append(True)
        atomic_write(path, data)

    monkeypatch.setattr(server_module, "atomic_write", recording_write)
    config = load_config(config_path, ["engine=flower", "data.num_clients=4", "server.clients_per_round=4"])
    simulate(server_module.make_server_app(config, out), client_app, 4)
    assert written == ["config.toml", "final_model.pt", "summary.json"]
    assert all(locked)
    assert final_files_problem(out) is None
    with lock_folder(out, "probe"):  # released at the end
        pass


def test_a_serverapp_failure_is_recorded_in_its_run_folder_and_another_runs_folder_is_left_alone(
        config_path, tmp_path, monkeypatch):
    """``flwr run`` exits 0 whatever the ServerApp raised, so the ServerApp records a failure in the run folder
    it claimed (error.txt, as a failed sweep run), where ``fedgma report`` counts it; a folder it refused
    (another config's finished run) gets nothing."""
    from fedgma.checkpoint import RunFolderError
    from fedgma.flower import server_app as server_module
    from fedgma.report.runs import find_incomplete

    config = load_config(config_path, ["engine=flower"])

    def no_data(config):
        raise OSError("dataset unreadable: disk gone")

    monkeypatch.setattr(server_module, "build_data", no_data)
    out = tmp_path / "failed"
    with pytest.raises(OSError, match="disk gone"):
        server_module.serve(None, config, out)  # fails before any message goes to the grid
    (failed,) = find_incomplete(out)
    assert failed == {"path": out, "status": "failed", "error": "OSError: dataset unreadable: disk gone"}
    assert (out / "config.toml").is_file() and not (out / "summary.json").exists()
    monkeypatch.undo()

    other = tmp_path / "other"
    run_fedgma(load_config(config_path, ["seed=4"]), other, progress=False)
    with pytest.raises(RunFolderError):
        server_module.serve(None, config, other)
    assert not (other / "error.txt").exists() and (other / "summary.json").is_file()
