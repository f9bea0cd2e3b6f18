"""Resume: a run interrupted at any moment and resumed writes exactly the logs of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedgma.simulation as simulation
from fedgma.checkpoint import latest_checkpoint
from fedgma.config import config_to_toml, load_config
from fedgma.data.federated import build_federated

TIMING = {"elapsed_s", "wall_s", "round_s", "checkpoint_s"}
DIGITS = [
    "data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=12", "data.min_size=5",
    "server.clients_per_round=4", "client.batch_size=32", "client.lr=0.05", "eval_every=2", "threads=1",
]


def records(run_dir: Path, name: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / name).read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("metrics.jsonl", "rounds.jsonl"):
        assert records(a, name) == records(b, name), name
    summary_a, summary_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in summary_a.items() if k not in TIMING} == {
        k: v for k, v in summary_b.items() if k not in TIMING}
    assert torch.equal(torch.load(a / "final_model.pt")["params"], torch.load(b / "final_model.pt")["params"])


@pytest.fixture(scope="module")
def digits_data():
    config = load_config(None, DIGITS)
    return build_federated(config.data, config.seed)


class Crash(Exception):
    pass


def crash_after_checkpoint(monkeypatch, at_round: int, before_saving: bool) -> None:
    """Make the run die at its checkpoint of ``at_round``: just before writing it, or just after."""
    save = simulation.save_checkpoint

    def dying_save(run_dir, round_index, state, *args, **kwargs):
        if round_index == at_round and before_saving:
            raise Crash
        path = save(run_dir, round_index, state, *args, **kwargs)
        if round_index == at_round:
            raise Crash
        return path

    monkeypatch.setattr(simulation, "save_checkpoint", dying_save)


@pytest.mark.parametrize(
    ("overrides", "at_round", "before_saving"),
    [
        (["algorithm=fedavg", "server.aggregator=gma"], 3, False),
        (["algorithm=fedavgm", "server.aggregator=mean"], 4, True),  # dies after logging round 4, unsaved
        (["algorithm=scaffold", "server.aggregator=gma"], 2, False),  # SCAFFOLD control variates
        (["algorithm=fedadam", "server.aggregator=median"], 5, True),  # server Adam moments
        (["algorithm=fedavg", "server.aggregator=trimmed_mean", "faults.nan=0.25", "faults.crash=0.25",
          "faults.sign_flip=0.25", "server.on_bad_update=drop", "faults.label_flip=0.2"], 3, False),  # faults
    ],
)
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, digits_data, overrides, at_round,
                                                      before_saving):
    config = load_config(None, [*DIGITS, "rounds=6", *overrides])
    simulation.run(config, tmp_path / "straight", progress=False, data=digits_data)

    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, at_round, before_saving)
        with pytest.raises(Crash):
            simulation.run(config, tmp_path / "resumed", progress=False, data=digits_data)
    assert not (tmp_path / "resumed" / "summary.json").exists()
    assert latest_checkpoint(tmp_path / "resumed")["round"] == (at_round - 1 if before_saving else at_round)
    simulation.run(config, tmp_path / "resumed", progress=False, data=digits_data, resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_resuming_a_finished_run_returns_its_summary(tmp_path, digits_data):
    config = load_config(None, [*DIGITS, "rounds=2"])
    summary = simulation.run(config, tmp_path, progress=False, data=digits_data)
    before = (tmp_path / "metrics.jsonl").read_text()
    assert simulation.run(config, tmp_path, progress=False, data=digits_data, resume=True) == json.loads(
        json.dumps(summary))
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_resume_without_checkpoint_starts_over_with_a_warning(tmp_path, digits_data):
    config = load_config(None, [*DIGITS, "rounds=2"])
    with pytest.warns(RuntimeWarning, match="no usable checkpoint"):
        simulation.run(config, tmp_path / "a", progress=False, data=digits_data, resume=True)
    simulation.run(config, tmp_path / "b", progress=False, data=digits_data)
    assert_same_run(tmp_path / "a", tmp_path / "b")


# --------------------------------------------------------------------------------------------
# The real thing: SIGKILL a `fedgma run` subprocess at a random moment, twice, then resume it
# --------------------------------------------------------------------------------------------

FEDGMA = [sys.executable, "-m", "fedgma.cli"]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*FEDGMA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rounds_done(run_dir: Path) -> int:
    path = run_dir / "rounds.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_after(process: subprocess.Popen, run_dir: Path, rounds: int, extra_s: float) -> None:
    deadline = time.monotonic() + 120
    while rounds_done(run_dir) < rounds and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(extra_s)  # land anywhere inside the next round, checkpoint writes included
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    rounds = 30  # digits rounds take tens of ms: kills land within the first 20 rounds, never after the end
    config_path = tmp_path / "digits.toml"
    config_path.write_text(config_to_toml(load_config(None, [*DIGITS, f"rounds={rounds}", "algorithm=fedavgm"])))
    straight = start(["run", str(config_path), "--out", str(tmp_path / "straight"), "--quiet"])

    moment_seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(moment_seed)  # random kill moments; the seed is in every failure message
    first, second = sorted(rng.sample(range(1, 20), 2))
    run_dir = tmp_path / "killed"
    kill_after(start(["run", str(config_path), "--out", str(run_dir), "--quiet"]), run_dir, first, rng.uniform(0, 0.03))
    done_before = rounds_done(run_dir)
    kill_after(start(["run", "--resume", str(run_dir), "--quiet"]), run_dir, second, rng.uniform(0, 0.03))
    resumed = start(["run", "--resume", str(run_dir), "--quiet"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, (moment_seed, err)
    assert "final test accuracy" in out
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    assert done_before < rounds, f"kill moments seed {moment_seed}: the first kill came after the run had finished"
    assert_same_run(tmp_path / "straight", run_dir)
