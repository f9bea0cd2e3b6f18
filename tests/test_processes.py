"""Processes: Ctrl-C of `fedgma run` says how to resume and keeps the checkpoint; `sweep --jobs 2` workers die
with the sweep (SIGKILL of the parent)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgma.checkpoint import list_checkpoints, load_checkpoint
from fedgma.config import config_to_toml, load_config

ROOT = Path(__file__).resolve().parents[1]
FEDGMA = [sys.executable, "-m", "fedgma.cli"]
DIGITS = [
    "data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=8", "data.min_size=5",
    "server.clients_per_round=3", "client.batch_size=32", "client.lr=0.05", "eval_every=5", "threads=1",
]


def rounds_done(run_dir: Path) -> int:
    path = run_dir / "rounds.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    assert condition(), "timed out"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_prints_how_to_resume_exits_130_and_keeps_the_checkpoint(tmp_path):
    rounds = 60
    config_path = tmp_path / "digits.toml"
    config_path.write_text(config_to_toml(load_config(None, [*DIGITS, f"rounds={rounds}"])))
    run_dir = tmp_path / "run"
    # SIGINT back to its default in the child: a test session started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt (the run would finish, exit 0)
    process = subprocess.Popen([*FEDGMA, "run", str(config_path), "--out", str(run_dir), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: rounds_done(run_dir) >= 3, process)
        assert process.poll() is None, "the run finished before it could be interrupted"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    saved = list_checkpoints(run_dir)
    assert saved and all(load_checkpoint(path)["round"] == r for r, path in saved)  # intact
    assert err.strip().splitlines()[-1] == (
        f"interrupted: its checkpoint of round {saved[-1][0]} is kept; continue with: fedgma run --resume {run_dir}")
    assert saved[-1][0] < rounds and not (run_dir / "summary.json").exists()
    resumed = subprocess.run([*FEDGMA, "run", "--resume", str(run_dir), "--quiet"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    logged = [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert logged == list(range(1, rounds + 1))


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie left for an init that does not reap counts as gone)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sweep_workers_exit_when_the_sweep_is_killed(tmp_path):
    out = tmp_path / "sweep"
    overrides = [*DIGITS, "rounds=2000", "checkpoint_every=0"]
    args = [*FEDGMA, "sweep", str(ROOT / "configs" / "paper" / "fmnist.toml"), "--out", str(out), "--jobs", "2",
            "--grid", "server.aggregator=mean,gma", *[a for item in overrides for a in ("--set", item)]]
    sweep = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len(list(out.glob("*/rounds.jsonl"))) == 2, sweep, timeout=180)  # both workers training
        workers = children(sweep.pid)
        assert len(workers) >= 2 and all(alive(pid) for pid in workers)
        os.kill(sweep.pid, signal.SIGKILL)  # the parent only
        sweep.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in workers if alive(pid)] == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)  # this test's own process group, should anything be left
