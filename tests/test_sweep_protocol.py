"""The tuning protocol as a sweep (``fedgma sweep --tune-server-lr``) and ``--server-lr-from``'s selection.

Most tests replace the training of a run by a scorer (``fake_runs``): a run's validation accuracy is a
known function of its server lr, so the widening, the choice, the layout and the resumption are checked
exactly and in milliseconds; one test runs the protocol on real (tiny) digits runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

import fedgma.sweep as sweep
from fedgma.checkpoint import read_jsonl
from fedgma.cli import main
from fedgma.config import ConfigError, config_to_toml, load_config
from fedgma.report.protocol import select_lr
from fedgma.sweep import EVALUATION, LR_CHOICES, TUNING, parse_grid, tune_and_evaluate, tuned_server_lrs

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper" / "fmnist.toml"  # fedavg, server lr 1, data.validation_fraction = 0.1
TINY = [
    "data.dataset=digits", "data.num_clients=6", "server.clients_per_round=3", "rounds=2", "eval_every=1",
    "client.local_steps=3", "client.lr=0.05", "data.validation_fraction=0.1",
]


def peak_at(best: float) -> Callable[[float, int], float]:
    """Validation accuracy falling by 0.1 per factor of 2 away from ``best``, the same on every seed."""
    return lambda lr, seed: 0.9 - 0.1 * abs(math.log2(lr / best))


def fake_runs(monkeypatch: pytest.MonkeyPatch, accuracy: Callable[[float, int], float]) -> list[Path]:
    """Runs that write 10 evaluations instead of training: validation accuracy 1.0 in rounds 1-8, and
    ``accuracy(lr, seed)`` ± 0.3 in rounds 9 and 10 (the last 20%; + in round 10 where log2(lr) is odd), so
    the mean of the last 20% is ``accuracy(lr, seed)`` while the whole curve or the last round alone would
    rank the lrs otherwise. A run is finished once its metrics exist. Returns the folders of the runs
    executed, in order."""
    executed: list[Path] = []

    def run_one(run: sweep.SweepRun, threads: int | None = None) -> None:
        executed.append(run.run_dir)
        score = accuracy(run.config.server.optimizer.lr, run.config.seed)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.toml").write_text(config_to_toml(run.config))  # a rerun checks it is the same
        swing = 0.3 if round(math.log2(run.config.server.optimizer.lr)) % 2 else -0.3
        validation = [1.0] * 8 + [score - swing, score + swing]
        records = [{"round": r, "validation_accuracy": v, "test_accuracy": 0.5} for r, v in enumerate(validation, 1)]
        (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    monkeypatch.setattr(sweep, "_run_one", run_one)
    monkeypatch.setattr(sweep.SweepRun, "finished", property(lambda self: (self.run_dir / "metrics.jsonl").is_file()))
    return executed


def test_the_grid_widens_while_the_pick_is_on_an_edge_then_evaluates_at_the_pick(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executed = fake_runs(monkeypatch, peak_at(16.0))
    stages: list[list[str]] = []
    points = tune_and_evaluate(PAPER, [parse_grid("server.aggregator=mean,gma")], tmp_path, [100, 101], 2,
                               on_plan=lambda runs: stages.append(sorted({r.run_dir.parent.parent.name for r in runs})))
    # start {0.5, 1, 2} (the config's lr 1 × 0.5, 1, 2), then 4, 8, 16, 32: 16 is interior
    assert [p.lr for p in points] == [16.0, 16.0]
    assert sorted(points[0].scores) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert points[0].scores[16.0] == pytest.approx(0.9) and points[0].scores[0.5] == pytest.approx(0.4)
    assert points[0].edge is None and not points[0].capped
    assert len(stages) == 6 and all(s == ["aggregator=gma", "aggregator=mean"] for s in stages)  # points in step
    tuning = sorted(p.name for p in (tmp_path / "aggregator=gma" / TUNING).iterdir() if p.is_dir())
    assert len(tuning) == 14 and "lr=16.0_seed100" in tuning and "lr=0.5_seed101" in tuning
    evaluation = [run for run in executed if run.parent.name == EVALUATION]
    assert sorted(run.relative_to(tmp_path).as_posix() for run in evaluation) == [
        "aggregator=gma/evaluation/seed0", "aggregator=gma/evaluation/seed1",
        "aggregator=mean/evaluation/seed0", "aggregator=mean/evaluation/seed1"]
    assert executed[-4:] == evaluation  # after every tuning run
    assert len(executed) == 2 * 14 + 4


def test_lr_choices_json_records_each_point_its_scores_and_seeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_runs(monkeypatch, peak_at(2.0))
    tune_and_evaluate(PAPER, [parse_grid("server.aggregator=mean")], tmp_path, [100, 101, 100], 1)  # 100 once
    choices = json.loads((tmp_path / LR_CHOICES).read_text())
    assert list(choices) == ["aggregator=mean"]
    choice = choices["aggregator=mean"]
    assert choice["lr"] == 2.0 and choice["edge"] is None and choice["on_cap"] is False
    assert choice["scores"] == pytest.approx({"0.5": 0.7, "1.0": 0.8, "2.0": 0.9, "4.0": 0.8})
    assert choice["overrides"] == ['server.aggregator="mean"']
    assert choice["tuning_seeds"] == [100, 101] and choice["evaluation_seeds"] == [0]
    # a later sweep of another point keeps this one's entry
    tune_and_evaluate(PAPER, [parse_grid("server.aggregator=gma")], tmp_path, [100, 101], 1)
    assert sorted(json.loads((tmp_path / LR_CHOICES).read_text())) == ["aggregator=gma", "aggregator=mean"]


def test_the_scores_average_the_tuning_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # seed 100 prefers lr 0.5 strongly, seed 101 prefers lr 2 slightly: the mean over both picks 0.5
    fake_runs(monkeypatch, lambda lr, seed: {0.25: 0.1, 0.5: 0.9, 1.0: 0.5, 2.0: 0.6, 4.0: 0.0}[lr] if seed == 100
              else {0.25: 0.1, 0.5: 0.5, 1.0: 0.55, 2.0: 0.6, 4.0: 0.0}[lr])
    (point,) = tune_and_evaluate(PAPER, [], tmp_path, [100, 101], 1, start_grid=[1.0, 2.0, 0.5])
    assert point.lr == 0.5 and point.scores[0.5] == pytest.approx(0.7) and point.scores[2.0] == pytest.approx(0.6)
    assert sorted(point.scores) == [0.25, 0.5, 1.0, 2.0]  # 0.5 started on the low edge: 0.25 was added
    assert point.name == "base" and (tmp_path / "base" / EVALUATION / "seed0" / "metrics.jsonl").is_file()


def test_widening_stops_at_the_cap_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_runs(monkeypatch, lambda lr, seed: lr / 100)  # the larger the better
    (point,) = tune_and_evaluate(PAPER, [], tmp_path, [100, 101], 1, cap=(2.0**-12, 4.0))
    assert point.lr == 4.0 and sorted(point.scores) == [0.5, 1.0, 2.0, 4.0]
    assert point.edge == "high" and point.capped
    assert json.loads((tmp_path / LR_CHOICES).read_text())["base"]["on_cap"] is True


def test_widening_stops_after_max_widenings_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_runs(monkeypatch, lambda lr, seed: lr / 100)
    (point,) = tune_and_evaluate(PAPER, [], tmp_path, [100, 101], 1, max_widenings=2)
    assert point.lr == 8.0 and sorted(point.scores) == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert point.edge == "high" and not point.capped


def test_a_rerun_skips_finished_runs_and_finishes_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executed = fake_runs(monkeypatch, peak_at(4.0))
    first = tune_and_evaluate(PAPER, [], tmp_path, [100, 101], 2)
    done = len(executed)
    assert done == 2 * 5 + 2  # lrs 0.5 ... 8, two tuning seeds; two evaluation seeds
    again = tune_and_evaluate(PAPER, [], tmp_path, [100, 101], 2)
    assert len(executed) == done and again == first  # nothing rerun, the same choice from the saved scores
    # an interruption: one widening run and one evaluation run lost
    (tmp_path / "base" / TUNING / "lr=8.0_seed101" / "metrics.jsonl").unlink()
    (tmp_path / "base" / EVALUATION / "seed1" / "metrics.jsonl").unlink()
    assert tune_and_evaluate(PAPER, [], tmp_path, [100, 101], 2) == first
    assert [p.relative_to(tmp_path).as_posix() for p in executed[done:]] == [
        "base/tuning/lr=8.0_seed101", "base/evaluation/seed1"]


def test_tiny_digits_runs_end_to_end_and_resume(tmp_path: Path) -> None:
    (point,) = tune_and_evaluate(PAPER, [], tmp_path, [100, 101], 1, TINY, start_grid=[0.5, 1.0], max_widenings=0)
    runs = {float(d.name.split("_")[0][3:]): {} for d in (tmp_path / "base" / TUNING).iterdir() if d.is_dir()}
    for folder in (tmp_path / "base" / TUNING).iterdir():
        if folder.is_dir():
            lr, seed = folder.name.split("_")
            runs[float(lr[3:])][int(seed[4:])] = read_jsonl(folder / "metrics.jsonl")
    assert sorted(runs) == [0.5, 1.0] and all(sorted(by_seed) == [100, 101] for by_seed in runs.values())
    expected = select_lr(runs)
    assert point.lr == expected.lr and point.scores == expected.scores and point.edge == expected.edge
    evaluated = load_config(tmp_path / "base" / EVALUATION / "seed0" / "config.toml")
    assert evaluated.server.optimizer.lr == point.lr and evaluated.seed == 0
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
    assert len(stamps) == 5
    assert tune_and_evaluate(PAPER, [], tmp_path, [100, 101], 1, TINY, start_grid=[0.5, 1.0], max_widenings=0) == [
        point]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")} == stamps


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, ["sweep", str(PAPER), *[a for item in TINY for a in ("--set", item)], *args])


@pytest.mark.parametrize(("args", "message"), [
    (["--tuning-seeds", "1,100", "--seeds", "5"], "seeds [1] are both tuning and evaluation seeds"),
    (["--tuning-seeds", "100", "--seeds", "5"], "need at least 2 tuning seeds"),
    (["--tuning-seeds", "100,101", "--set", "data.validation_fraction=0"], "data.validation_fraction = 0"),
    (["--tuning-seeds", "100,101", "--grid", "server.optimizer.lr=1,2"], "--grid server.optimizer.lr"),
    ([], "--tune-server-lr needs --tuning-seeds"),
    (["--tuning-seeds", "100,x"], "--tuning-seeds takes integers"),
])
def test_cli_refuses_a_bad_protocol_in_one_line_before_running(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke("--tune-server-lr", "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and message in error[0], result.output
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_cli_refuses_tuning_seeds_without_tuning_and_two_lr_sources(tmp_path: Path) -> None:
    result = invoke("--tuning-seeds", "100,101", "--out", str(tmp_path))
    assert result.exit_code == 2 and "--tuning-seeds needs --tune-server-lr" in result.output
    result = invoke("--tune-server-lr", "--tuning-seeds", "100,101", "--server-lr-from", str(tmp_path))
    assert result.exit_code == 2 and "give one" in result.output


def test_cli_tunes_warns_below_five_seeds_and_points_report_at_evaluation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_runs(monkeypatch, peak_at(0.5))
    out = tmp_path / "out"
    result = invoke("--grid", "server.aggregator=mean,gma", "--tune-server-lr", "0.25,0.5,1", "--tuning-seeds",
                    "100,101", "--seeds", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "warning: 3 evaluation seeds (--seeds): the comparison is below the protocol's 5 seeds" in result.output
    assert "aggregator=mean: server lr 0.5 (validation % 0.25: 80.00, 0.5: 90.00, 1: 80.00)" in result.output
    assert sorted(json.loads((out / LR_CHOICES).read_text())) == ["aggregator=gma", "aggregator=mean"]
    assert len(list(out.glob("*/evaluation/seed*"))) == 6 and len(list(out.glob("*/tuning/lr=*"))) == 12
    result = invoke("--tune-server-lr", "--tuning-seeds", "100,101", "--seeds", "5", "--out", str(tmp_path / "b"))
    assert result.exit_code == 0 and "warning" not in result.output


def write_run(folder: Path, lr: float, validation: list[float], aggregator: str = "mean", seed: int = 0) -> None:
    """A hand-written finished run: validation accuracy per round 1, 2, ... (the last 20% of 10 rounds: 9-10)."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(
        f'algorithm = "fedavg"\nseed = {seed}\n[server.aggregator]\nname = "{aggregator}"\n'
        f'[server.optimizer]\nname = "sgd"\nlr = {lr!r}\n')
    records = [{"round": r, "validation_accuracy": v, "test_accuracy": 0.5} for r, v in enumerate(validation, 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    final = {"round": len(validation), "validation_accuracy": validation[-1] if validation else None,
             "test_accuracy": 0.5}
    (folder / "summary.json").write_text(json.dumps(
        {"status": "finished", "algorithm": "fedavg", "aggregator": aggregator, "final": final}))


def test_server_lr_from_chooses_on_the_last_20_percent_averaged_over_seeds(tmp_path: Path) -> None:
    early = [0.1] * 8
    # lr 1: last 20% 0.9, 0.5 (final 0.5) on both seeds: 0.7; lr 2: 0.55, 0.6 (final 0.6): 0.575
    for seed in (0, 1):
        write_run(tmp_path / f"lr=1_seed{seed}", 1.0, [*early, 0.9, 0.5], seed=seed)
        write_run(tmp_path / f"lr=2_seed{seed}", 2.0, [*early, 0.55, 0.6], seed=seed)
    # lr 4: the best on seed 0 (0.95), diverged on seed 1 (scores 0): 0.475
    write_run(tmp_path / "lr=4_seed0", 4.0, [*early, 0.95, 0.95])
    write_run(tmp_path / "lr=4_seed1", 4.0, [], seed=1)
    for name in ("metrics.jsonl", "summary.json"):
        (tmp_path / "lr=4_seed1" / name).unlink()
    (tmp_path / "lr=4_seed1" / sweep.DIVERGED).write_text(json.dumps({"status": "diverged"}))
    # gma: one lr, final-round and last-20% agree
    write_run(tmp_path / "gma_lr=0.5_seed0", 0.5, [*early, 0.8, 0.8], aggregator="gma")
    write_run(tmp_path / "gma_lr=1_seed0", 1.0, [*early, 0.7, 0.7], aggregator="gma")
    chosen = tuned_server_lrs(tmp_path)
    assert chosen[("fedavg", "mean")].lr == 1.0  # the final round alone would pick 2
    assert chosen[("fedavg", "mean")].scores == pytest.approx({1.0: 0.7, 2.0: 0.575, 4.0: 0.475})
    assert chosen[("fedavg", "mean")].edge == "low"
    assert chosen[("fedavg", "gma")].lr == 0.5
    result = invoke("--grid", "server.aggregator=mean", "--server-lr-from", str(tmp_path), "--out",
                    str(tmp_path.parent / "tuned"))
    assert result.exit_code == 0, result.output
    assert "server lr for fedavg+mean: 1 (the lowest lr tried: widen the grid)" in result.output
    assert load_config(tmp_path.parent / "tuned" / "aggregator=mean_seed0" / "config.toml").server.optimizer.lr == 1.0


def test_server_lr_from_refuses_runs_without_validation(tmp_path: Path) -> None:
    write_run(tmp_path / "lr=1_seed0", 1.0, [0.5] * 10)
    text = (tmp_path / "lr=1_seed0" / "metrics.jsonl").read_text().replace('"validation_accuracy"', '"other"')
    (tmp_path / "lr=1_seed0" / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match="data.validation_fraction > 0"):
        tuned_server_lrs(tmp_path)
    with pytest.raises(ValueError, match="no finished tuning runs"):
        tuned_server_lrs(tmp_path / "lr=1_seed0" / "nothing")


def test_library_refusals_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="start grid needs server lrs > 0"):
        tune_and_evaluate(PAPER, [], tmp_path, [100, 101], 1, TINY, start_grid=[0.0, 1.0])
    with pytest.raises(ConfigError, match="--grid seed"):
        tune_and_evaluate(PAPER, [parse_grid("seed=1,2")], tmp_path, [100, 101], 1, TINY)
