"""Sweeps: grid parsing, run folders, tuned server lr, resuming after an interruption, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedgma.cli import main
from fedgma.config import ConfigError
from fedgma.sweep import DIVERGED, expand_grid, parse_grid, plan_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper" / "fmnist.toml"
# a tiny but real run: digits, 6 clients, 3 per round, 2 rounds of 3 local steps
TINY = [
    "data.dataset=digits", "data.num_clients=6", "server.clients_per_round=3", "rounds=2", "eval_every=1",
    "client.local_steps=3", "client.lr=0.05", "data.validation_fraction=0.1",
]


def test_parse_grid_reads_toml_scalars_and_bare_strings() -> None:
    assert parse_grid("server.threshold=0,0.4,1") == ("server.threshold", [0, 0.4, 1])
    assert parse_grid("server.aggregator=mean,gma") == ("server.aggregator", ["mean", "gma"])
    assert parse_grid("server.hard=true") == ("server.hard", [True])


@pytest.mark.parametrize(("item", "message"), [("server.lr", "must look like key=v1,v2"), ("server.lr=", "no values")])
def test_parse_grid_rejects_bad_items(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_grid(item)


def test_expand_grid_is_the_cartesian_product_first_key_slowest() -> None:
    combos = expand_grid([("a.x", [1, 2]), ("b.y", ["p", "q", "r"])])
    assert len(combos) == 6
    assert combos[0] == ("a.x=1", 'b.y="p"') and combos[1] == ("a.x=1", 'b.y="q"') and combos[3][0] == "a.x=2"


def test_plan_names_folders_by_grid_values_and_seed(tmp_path: Path) -> None:
    plan = plan_sweep(PAPER, [parse_grid("server.aggregator=mean,gma")], 2, tmp_path, TINY)
    assert [r.run_dir.name for r in plan] == [
        "aggregator=mean_seed0", "aggregator=mean_seed1", "aggregator=gma_seed0", "aggregator=gma_seed1",
    ]
    assert [r.config.seed for r in plan] == [0, 1, 0, 1]
    assert {r.config.server.aggregator.name for r in plan} == {"mean", "gma"}


def test_plan_keeps_full_keys_when_last_components_clash(tmp_path: Path) -> None:
    plan = plan_sweep(PAPER, [parse_grid("server.lr=1,2"), parse_grid("client.lr=0.1")], 1, tmp_path, TINY)
    assert plan[0].run_dir.name == "server.lr=1_client.lr=0.1_seed0"
    assert plan[1].config.server.optimizer.lr == 2 and plan[1].config.client.lr == 0.1


def test_plan_applies_tuned_server_lr_per_algorithm_and_aggregator(tmp_path: Path) -> None:
    tuned = {("fedavg", "mean"): 1.0, ("fedavg", "gma"): 2.0}
    plan = plan_sweep(PAPER, [parse_grid("server.aggregator=mean,gma")], 1, tmp_path, TINY, tuned)
    assert [(r.config.server.aggregator.name, r.config.server.optimizer.lr) for r in plan] == [
        ("mean", 1.0), ("gma", 2.0)]
    with pytest.raises(ConfigError, match="no tuned server lr for fedprox\\+mean"):
        plan_sweep(PAPER, [parse_grid("algorithm=fedprox")], 1, tmp_path, [*TINY, "server.aggregator=mean"], tuned)


def test_plan_rejects_bad_seeds_and_bad_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--seeds must be ≥ 1"):
        plan_sweep(PAPER, [], 0, tmp_path, TINY)
    with pytest.raises(ConfigError, match="unknown config key 'server.treshold'"):
        plan_sweep(PAPER, [parse_grid("server.treshold=0.1")], 1, tmp_path, TINY)


def test_run_sweep_skips_finished_runs_and_restarts_unfinished_ones(tmp_path: Path) -> None:
    plan = plan_sweep(PAPER, [parse_grid("server.aggregator=mean,gma")], 1, tmp_path, TINY)
    assert run_sweep(plan[:1]) == plan[:1]
    finished = plan[0].run_dir / "summary.json"
    stamp, content = finished.stat().st_mtime_ns, finished.read_bytes()
    # an interrupted run: a folder with partial logs and no summary.json
    plan[1].run_dir.mkdir(parents=True)
    (plan[1].run_dir / "metrics.jsonl").write_text('{"round": 1, "partial": true}\n')
    seen: list[tuple[str, bool]] = []
    redone = run_sweep(plan, on_done=lambda run, summary: seen.append((run.run_dir.name, summary is None)))
    assert redone == [plan[1]]
    assert seen == [("aggregator=mean_seed0", True), ("aggregator=gma_seed0", False)]
    assert finished.stat().st_mtime_ns == stamp and finished.read_bytes() == content
    assert "partial" not in (plan[1].run_dir / "metrics.jsonl").read_text()
    assert all(run.finished for run in plan)
    assert run_sweep(plan) == []


def test_divergence_is_recorded_and_counts_as_finished(tmp_path: Path) -> None:
    diverging = [*TINY, "server.aggregator=mean", "server.optimizer.lr=1000", "client.lr=100"]
    plan = plan_sweep(PAPER, [], 1, tmp_path, diverging)
    done: list[object] = []
    run_sweep(plan, on_done=lambda run, summary: done.append(summary))
    record = json.loads((plan[0].run_dir / DIVERGED).read_text())
    assert record["status"] == "diverged" and record["aggregator"] == "mean"
    assert done == [None] and plan[0].finished and run_sweep(plan) == []


def test_parallel_jobs_give_the_same_results_as_sequential(tmp_path: Path) -> None:
    grid = [parse_grid("server.aggregator=mean,gma")]
    sequential = plan_sweep(PAPER, grid, 1, tmp_path / "seq", TINY)
    parallel = plan_sweep(PAPER, grid, 1, tmp_path / "par", TINY)
    run_sweep(sequential)
    run_sweep(parallel, jobs=2)
    for a, b in zip(sequential, parallel, strict=True):
        assert (a.run_dir / "metrics.jsonl").read_text().count("test_accuracy") == 2
        first = [json.loads(line)["test_accuracy"] for line in (a.run_dir / "metrics.jsonl").read_text().splitlines()]
        second = [json.loads(line)["test_accuracy"] for line in (b.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert first == second


def test_cli_sweep_interrupted_midway_resumes_without_redoing_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "fedgma.cli", "sweep", str(PAPER), "--out", str(out), "--seeds", "2",
            "--grid", "server.aggregator=mean,gma", *[a for item in TINY for a in ("--set", item)]]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*/summary.json")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # interrupt midway (this test's own child process group)
    first.wait()
    done_before = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert 1 <= len(done_before) < 4, "the sweep should have been interrupted after its first run"
    result = CliRunner().invoke(main, args[3:])
    assert result.exit_code == 0, result.output
    assert f"4 runs in {out} ({len(done_before)} already finished)" in result.output
    assert len(list(out.glob("*/summary.json"))) == 4
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in done_before.items())


def test_cli_sweep_reports_a_bad_grid_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["sweep", str(PAPER), "--grid", "server.nope=1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown config key 'server.nope'" in result.output


def test_a_finished_run_of_another_config_is_not_reused(tmp_path: Path) -> None:
    run_sweep(plan_sweep(PAPER, [parse_grid("server.aggregator=mean")], 1, tmp_path, [*TINY, "server.lr=1"]))
    changed = plan_sweep(PAPER, [parse_grid("server.aggregator=mean")], 1, tmp_path, [*TINY, "server.lr=2"])
    with pytest.raises(ConfigError, match="server.optimizer.lr = 1.0 there, 2.0 planned"):
        run_sweep(changed)


def test_an_interrupted_sweep_resumes_its_runs_from_their_checkpoints(tmp_path: Path, monkeypatch) -> None:
    import fedgma.simulation as simulation
    from fedgma.checkpoint import latest_checkpoint
    from fedgma.sweep import FAILED, SweepError

    overrides = [*TINY, "rounds=4", "checkpoint_every=1"]
    straight = plan_sweep(PAPER, [], 1, tmp_path / "straight", overrides)
    run_sweep(straight)
    plan = plan_sweep(PAPER, [], 1, tmp_path / "sweep", overrides)
    save = simulation.save_checkpoint

    def dying_save(run_dir, round_index, state, *args, **kwargs):  # killed just after round 3's checkpoint
        path = save(run_dir, round_index, state, *args, **kwargs)
        if round_index == 3:
            raise KeyError("killed")
        return path

    with monkeypatch.context() as patch:
        patch.setattr(simulation, "save_checkpoint", dying_save)
        with pytest.raises(SweepError):
            run_sweep(plan)
    run_dir = plan[0].run_dir
    assert latest_checkpoint(run_dir)["round"] == 3 and (run_dir / FAILED).is_file()
    written = (run_dir / "rounds.jsonl").read_text().splitlines()
    assert len(written) == 3
    assert run_sweep(plan) == plan
    after = (run_dir / "rounds.jsonl").read_text().splitlines()
    assert after[:3] == written  # byte-identical, round_s included: rounds 1-3 were not trained again
    assert not (run_dir / FAILED).exists()

    def without_timing(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                for line in path.read_text().splitlines()]

    for name in ("rounds.jsonl", "metrics.jsonl"):
        assert without_timing(run_dir / name) == without_timing(straight[0].run_dir / name)
