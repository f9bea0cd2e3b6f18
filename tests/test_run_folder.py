"""Run-folder integrity: atomic final files (model, then summary), rebuilt when damaged, corrupt files named,
one writer per folder, no silent replacement of another config's run, sanitised default names, CLI refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import fedgma.simulation as simulation
from fedgma.checkpoint import (
    FolderInUseError,
    RunFolderError,
    final_files_problem,
    list_checkpoints,
    lock_folder,
    read_json,
)
from fedgma.cli import _default_run_dir, main
from fedgma.config import config_to_toml, load_config
from fedgma.data.federated import build_federated
from fedgma.sweep import plan_sweep, run_sweep

TIMING = {"elapsed_s", "wall_s", "round_s", "checkpoint_s"}
DIGITS = [
    "data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=8", "data.min_size=5",
    "server.clients_per_round=3", "client.batch_size=32", "client.lr=0.05", "eval_every=1", "threads=1", "rounds=3",
]


@pytest.fixture(scope="module")
def digits_data():
    config = load_config(None, DIGITS)
    return build_federated(config.data, config.seed)


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("metrics.jsonl", "rounds.jsonl"):
        assert [without_timing(json.loads(x)) for x in (a / name).read_text().splitlines()] == [
            without_timing(json.loads(x)) for x in (b / name).read_text().splitlines()], name
    assert without_timing(read_json(a / "summary.json")) == without_timing(read_json(b / "summary.json"))
    assert torch.equal(torch.load(a / "final_model.pt")["params"], torch.load(b / "final_model.pt")["params"])


class Crash(Exception):
    pass


def test_the_model_is_written_before_the_summary_and_a_kill_between_them_is_resumed(tmp_path, monkeypatch,
                                                                                     digits_data):
    config = load_config(None, DIGITS)
    simulation.run(config, tmp_path / "straight", progress=False, data=digits_data)
    written: list[str] = []
    real_write = simulation.atomic_write

    def dying_write(path, data):
        written.append(Path(path).name)
        if Path(path).name == "summary.json":
            raise Crash
        real_write(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(simulation, "atomic_write", dying_write)
        with pytest.raises(Crash):
            simulation.run(config, tmp_path / "killed", progress=False, data=digits_data)
    assert written[-2:] == ["final_model.pt", "summary.json"]
    assert not (tmp_path / "killed" / "summary.json").exists()
    assert not [p.name for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]
    simulation.run(config, tmp_path / "killed", progress=False, data=digits_data, resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("summary.json", b"", "summary.json is truncated or corrupt, not valid JSON (Expecting value: line 1 column 1"),
    ("summary.json", b'{"name": "x", "status": "fin', "summary.json is truncated or corrupt, not valid JSON"),
    ("final_model.pt", b"PK\x03\x04", "final_model.pt is truncated or corrupt"),
    ("final_model.pt", None, "final_model.pt is missing"),
])
def test_resume_rebuilds_damaged_final_files_from_the_last_checkpoint(tmp_path, digits_data, name, damage, message):
    config = load_config(None, DIGITS)
    simulation.run(config, tmp_path / "straight", progress=False, data=digits_data)
    simulation.run(config, tmp_path / "damaged", progress=False, data=digits_data)
    path = tmp_path / "damaged" / name
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage)
    assert final_files_problem(tmp_path / "damaged").startswith(f"{tmp_path / 'damaged'}{os.sep}{message}")
    with pytest.warns(RuntimeWarning) as caught:
        simulation.run(config, tmp_path / "damaged", progress=False, data=digits_data, resume=True)
    [warning] = [str(w.message) for w in caught if "rebuilding" in str(w.message)]
    assert warning.startswith(f"{tmp_path / 'damaged'}{os.sep}{message}")
    assert warning.endswith(": rebuilding the final files from the last checkpoint")
    assert final_files_problem(tmp_path / "damaged") is None
    assert_same_run(tmp_path / "straight", tmp_path / "damaged")


def test_a_corrupt_json_file_is_named_in_its_error(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("")
    with pytest.raises(RunFolderError) as caught:
        read_json(path)
    assert str(caught.value) == (f"{path} is truncated or corrupt, not valid JSON "
                                 "(Expecting value: line 1 column 1 (char 0))")
    assert str(pytest.raises(RunFolderError, read_json, tmp_path / "none.json").value) == (
        f"cannot read {tmp_path / 'none.json'}: No such file or directory")


def test_a_sweep_treats_a_damaged_summary_as_unfinished_and_rebuilds_it(tmp_path):
    root = Path(__file__).resolve().parents[1]
    plan = plan_sweep(root / "configs" / "paper" / "fmnist.toml", [], 1, tmp_path, [*DIGITS, "checkpoint_every=1"])
    run_sweep(plan)
    summary = plan[0].run_dir / "summary.json"
    good = without_timing(read_json(summary))
    model = torch.load(plan[0].run_dir / "final_model.pt")["params"]
    summary.write_text("")
    assert not plan[0].finished
    with pytest.warns(RuntimeWarning, match=f"{summary} is truncated or corrupt"):
        assert run_sweep(plan) == plan
    assert without_timing(read_json(summary)) == good
    assert torch.equal(torch.load(plan[0].run_dir / "final_model.pt")["params"], model)


def test_a_second_writer_is_refused_while_the_folder_is_locked(tmp_path, digits_data):
    config = load_config(None, DIGITS)
    with lock_folder(tmp_path / "run", "run"), pytest.raises(FolderInUseError) as caught:
        simulation.run(config, tmp_path / "run", progress=False, data=digits_data)
    assert str(caught.value) == (f"{tmp_path / 'run'} is in use by another fedgma run (pid {os.getpid()}); "
                                 "wait for it to end or use another --out")
    assert not (tmp_path / "run" / "config.toml").exists()
    simulation.run(config, tmp_path / "run", progress=False, data=digits_data)  # released: runs
    assert final_files_problem(tmp_path / "run") is None


def test_a_second_sweep_on_one_out_folder_is_refused(tmp_path):
    root = Path(__file__).resolve().parents[1]
    plan = plan_sweep(root / "configs" / "paper" / "fmnist.toml", [], 1, tmp_path, DIGITS)
    with lock_folder(tmp_path, "sweep"), pytest.raises(FolderInUseError) as caught:
        run_sweep(plan)
    assert str(caught.value) == (f"{tmp_path} is in use by another fedgma sweep (pid {os.getpid()}); "
                                 "wait for it to end or use another --out")
    assert not plan[0].run_dir.exists()


def test_two_fedgma_runs_on_one_folder_the_second_is_refused_in_one_line(tmp_path):
    config_path = tmp_path / "digits.toml"
    config_path.write_text(config_to_toml(load_config(None, [*DIGITS, "rounds=400"])))
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "fedgma.cli", "run", str(config_path), "--out", str(out),
                              "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "rounds.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run should still be running"
        other = tmp_path / "other.toml"
        other.write_text(config_to_toml(load_config(None, [*DIGITS, "rounds=2", "seed=5"])))
        second = CliRunner().invoke(main, ["run", str(other), "--out", str(out), "--quiet"])
    finally:
        first.kill()
        first.wait()
    assert second.exit_code == 2
    assert second.output.strip().splitlines()[-1] == (
        f"Error: {out} is in use by another fedgma run (pid {first.pid}); wait for it to end or use another --out")
    assert "seed = 5" not in (out / "config.toml").read_text()


def test_a_finished_run_of_another_config_is_replaced_only_with_overwrite(tmp_path, digits_data):
    simulation.run(load_config(None, DIGITS), tmp_path, progress=False, data=digits_data)
    before = (tmp_path / "summary.json").read_bytes()
    other = load_config(None, [*DIGITS, "client.lr=0.1"])
    with pytest.raises(RunFolderError) as caught:
        simulation.run(other, tmp_path, progress=False, data=digits_data)
    assert str(caught.value) == (f"{tmp_path} holds a finished run of another config (client.lr = 0.05 there, "
                                 "0.1 planned); use another --out, or --overwrite to replace it")
    assert (tmp_path / "summary.json").read_bytes() == before
    simulation.run(load_config(None, DIGITS), tmp_path, progress=False, data=digits_data)  # same config: a rerun
    (tmp_path / "error.txt").write_text("RuntimeError: an earlier attempt failed\n")
    simulation.run(other, tmp_path, progress=False, data=digits_data, overwrite=True)
    assert not (tmp_path / "error.txt").exists()  # a fresh start clears an earlier attempt's failure
    assert read_json(tmp_path / "summary.json")["final"] != json.loads(before)["final"]
    assert "lr = 0.1" in (tmp_path / "config.toml").read_text()


def test_cli_run_refuses_another_configs_folder_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "run"
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text(config_to_toml(load_config(None, [*DIGITS, "rounds=1"])))
    second.write_text(config_to_toml(load_config(None, [*DIGITS, "rounds=1", "seed=3"])))
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(first), "--out", str(out), "--quiet"]).exit_code == 0
    refused = runner.invoke(main, ["run", str(second), "--out", str(out), "--quiet"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines()[-1] == (
        f"Error: {out} holds a finished run of another config (seed = 0 there, 3 planned); "
        "use another --out, or --overwrite to replace it")
    replaced = runner.invoke(main, ["run", str(second), "--out", str(out), "--quiet", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert read_json(out / "summary.json")["seed"] == 3


@pytest.mark.parametrize(("name", "folder"), [
    ("../../escape", "escape-fedavg-gma-seed0"),
    ("/etc/passwd", "etc-passwd-fedavg-gma-seed0"),
    ("..", "fedavg-gma-seed0"),
    ("a/../b\\c d", "a-b-c-d-fedavg-gma-seed0"),
    ("fmnist-0.5", "fmnist-0.5-fedavg-gma-seed0"),
])
def test_default_run_folder_names_stay_inside_runs(tmp_path, monkeypatch, name, folder):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, [f"name={json.dumps(name)}", "server.aggregator=gma", "algorithm=fedavg"])
    path = _default_run_dir(config)
    assert path == Path("runs") / folder
    assert (tmp_path / path).resolve().parent == (tmp_path / "runs").resolve()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cli_device_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path):
    config_path = tmp_path / "digits.toml"
    config_path.write_text(config_to_toml(load_config(None, DIGITS)))
    result = CliRunner().invoke(main, ["run", str(config_path), "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert result.exit_code == 2
    assert result.output == (
        "Error: config key 'device': 'cuda', but this torch has no usable CUDA (torch.cuda.is_available() is False); "
        "use --device cpu or install a CUDA build of torch\n")
    assert not (tmp_path / "run").exists()


def test_cli_sweep_refuses_jobs_0_in_one_line(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(main, ["sweep", str(root / "configs" / "paper" / "fmnist.toml"), "--jobs", "0",
                                       "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 2
    assert "Invalid value for '--jobs': 0 is not in the range x>=1." in result.output
    assert not (tmp_path / "sweep").exists()


def test_cli_run_prints_the_resolved_key_hyperparameters_first(tmp_path):
    from fedgma.cli import _key_hyperparameters

    config = load_config(None, [*DIGITS, "rounds=1", "algorithm=fedadam", "server.aggregator=gma"])
    config_path = tmp_path / "digits.toml"
    config_path.write_text(config_to_toml(config))
    result = CliRunner().invoke(main, ["run", str(config_path), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first == f"{tmp_path / 'run'}: {_key_hyperparameters(config)}"
    # the recipe's own server optimizer and lr (FedAdam: adam at 0.01), the aggregator and its tau
    assert "fedadam" in first and "server adam lr 0.01" in first and "gma" in first and "0.4" in first
    assert list_checkpoints(tmp_path / "run")[-1][0] == 1


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("summary.json", "", "summary.json is truncated or corrupt, not valid JSON (Expecting value: line 1 column 1"),
    ("metrics.jsonl", '{"round": 1, "test_accuracy": 0.5}\n{"round": 2, "test_acc',
     "metrics.jsonl line 2 is truncated or corrupt, not valid JSON (Unterminated string"),
    ("config.toml", "rounds = ", "config.toml is truncated or corrupt, not valid TOML (Invalid value"),
])
def test_fedgma_report_names_a_corrupt_file_in_one_line(tmp_path, digits_data, name, damage, message):
    run_dir = tmp_path / "runs" / "a"
    simulation.run(load_config(None, DIGITS), run_dir, progress=False, data=digits_data)
    (run_dir / name).write_text(damage)
    result = CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: {run_dir / message}")
    assert len(result.output.strip().splitlines()) == 1
