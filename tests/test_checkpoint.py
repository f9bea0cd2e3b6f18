"""Checkpoint files: atomic writes, checksums, fallback to the previous good one, log truncation."""

from __future__ import annotations

import json

import pytest
import torch

from fedgma.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    truncate_jsonl,
)
from fedgma.config import load_config
from fedgma.simulation import run

DIGITS = [
    "data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=10", "data.min_size=5",
    "server.clients_per_round=4", "client.batch_size=32", "client.lr=0.05", "eval_every=2", "threads=1",
]


def state(round_index):
    return {"round": round_index, "params": torch.arange(5.0) * round_index, "nested": {"m": None, "v": [1, 2.5]}}


def test_roundtrip_and_only_the_newest_are_kept(tmp_path):
    for r in range(1, 5):
        save_checkpoint(tmp_path, r, state(r), keep=2)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    loaded = latest_checkpoint(tmp_path)
    assert loaded["round"] == 4 and torch.equal(loaded["params"], torch.arange(5.0) * 4)
    assert loaded["nested"] == {"m": None, "v": [1, 2.5]}


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, damage):
    save_checkpoint(tmp_path, 1, state(1))
    newest = save_checkpoint(tmp_path, 2, state(2))
    raw = newest.read_bytes()
    if damage == "flip":
        raw = raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:]
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "empty":
        raw = b""
    else:
        raw = b"not a checkpoint at all" * 10
    newest.write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"round-000002\.pt is (corrupt|truncated)"):
        load_checkpoint(newest)
    with pytest.warns(RuntimeWarning, match="falling back to the previous checkpoint"):
        loaded = latest_checkpoint(tmp_path)
    assert loaded["round"] == 1


def test_no_good_checkpoint_gives_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    path = save_checkpoint(tmp_path, 3, state(3))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(RuntimeWarning, match="bad header"):
        assert latest_checkpoint(tmp_path) is None


def test_truncate_jsonl_keeps_earlier_rounds_verbatim_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"round": r, "x": 0.1 * r}) for r in (2, 4, 6)]
    path.write_text("\n".join(lines) + '\n{"round": 8, "x": 0.')  # killed mid-write
    kept = truncate_jsonl(path, 4)
    assert [r["round"] for r in kept] == [2, 4]
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert truncate_jsonl(tmp_path / "missing.jsonl", 3) == []


def test_a_run_checkpoints_every_round_with_everything_needed(tmp_path):
    config = load_config(None, [*DIGITS, "rounds=3", "algorithm=scaffold"])
    run(config, tmp_path, progress=False)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [2, 3]
    checkpoint = latest_checkpoint(tmp_path)
    final = torch.load(tmp_path / "final_model.pt")
    assert checkpoint["round"] == 3 and torch.equal(checkpoint["params"], final["params"])
    assert set(checkpoint) >= {"config", "params", "server_optimizer", "client_algorithm", "torch_rng_state",
                               "total_steps"}
    assert len(checkpoint["client_algorithm"]["store"]["clients"]) > 0  # SCAFFOLD's c_i are saved (by reference)
    assert checkpoint["total_steps"] == json.loads((tmp_path / "summary.json").read_text())["total_local_steps"]


def test_checkpoint_every_and_off(tmp_path):
    run(load_config(None, [*DIGITS, "rounds=5", "checkpoint_every=2"]), tmp_path / "every2", progress=False)
    assert [r for r, _ in list_checkpoints(tmp_path / "every2")] == [4, 5]  # 2, 4 and the last round; keep 2
    run(load_config(None, [*DIGITS, "rounds=2", "checkpoint_every=0"]), tmp_path / "off", progress=False)
    assert list_checkpoints(tmp_path / "off") == []


def test_resuming_with_another_config_is_refused(tmp_path):
    run(load_config(None, [*DIGITS, "rounds=2"]), tmp_path, progress=False)
    (tmp_path / "summary.json").unlink()
    with pytest.raises(CheckpointError, match=r"written with another config \(differs in: .*lr = 0.1"):
        run(load_config(None, [*DIGITS, "rounds=2", "client.lr=0.1"]), tmp_path, progress=False, resume=True)


def test_a_fresh_run_with_overwrite_clears_old_checkpoints(tmp_path):
    run(load_config(None, [*DIGITS, "rounds=3"]), tmp_path, progress=False)
    run(load_config(None, [*DIGITS, "rounds=1"]), tmp_path, progress=False, overwrite=True)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1]
