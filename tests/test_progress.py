"""Run output: one plain line per evaluation when stdout is not a terminal, and TensorBoard logging of
every per-round and per-evaluation metric (skipped when tensorboard is not installed)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedgma.progress import ProgressBar, evaluation_line

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.dataset=digits", "data.num_clients=6", "server.clients_per_round=3", "rounds=4", "eval_every=2",
        "client.local_steps=3", "checkpoint_every=0"]


def test_plain_lines_per_evaluation_when_not_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(10, enabled=True, stream=stream)
    bar.update(1)
    bar.update(5, {"round": 5, "test_accuracy": 0.81234, "test_loss": 0.54321, "elapsed_s": 12.34})
    bar.update(6)
    bar.close()
    assert stream.getvalue() == "round 5/10  test acc 0.8123  test loss 0.5432  elapsed 12.3 s\n"
    quiet = io.StringIO()
    ProgressBar(10, enabled=False, stream=quiet).update(5, {"round": 5, "test_accuracy": 0.5})
    assert quiet.getvalue() == ""
    assert evaluation_line(3, 4, {"test_accuracy": 0.5}) == "round 3/4  test acc 0.5000"


def test_fedgma_run_into_a_pipe_prints_every_evaluation(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fedgma.cli", "run", str(ROOT / "configs" / "quickstart.toml"),
               "--out", str(tmp_path / "run"), *[a for item in TINY for a in ("--set", item)]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("round ")]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    for line, record in zip(lines, metrics, strict=True):
        assert f"test acc {record['test_accuracy']:.4f}" in line and f"test loss {record['test_loss']:.4f}" in line
        assert "elapsed" in line


def test_tensorboard_logs_every_metric(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedgma.config import load_config
    from fedgma.simulation import run

    config = load_config(ROOT / "configs" / "quickstart.toml", [*TINY, "tensorboard=true"])
    run(config, tmp_path / "run", progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert {"eval/test_accuracy", "eval/test_loss", "round/train_loss", "round/mask_density"} <= tags
    logged = events.Scalars("eval/test_accuracy")
    assert [e.step for e in logged] == [m["round"] for m in metrics] == [2, 4]
    assert [e.value for e in logged] == pytest.approx([m["test_accuracy"] for m in metrics], abs=1e-6)  # float32
    assert [e.step for e in events.Scalars("round/train_loss")] == [r["round"] for r in rounds]
