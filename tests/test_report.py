"""Reports: the table's numbers against the run folders (the last-20% metric), GMA's paired gain, server-lr
selection on validation (never test), rounds to target, plots, and the `fedgma report` command. The
protocol's report features on hand-made runs with known answers: tests/test_report_protocol.py."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from fedgma.cli import main
from fedgma.report import (
    find_runs,
    gain_rows,
    make_groups,
    rounds_to_target,
    select_server_lr,
    t_quantile,
    table_rows,
    write_report,
)
from fedgma.sweep import parse_grid, plan_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper" / "fmnist.toml"
TINY = [
    "data.dataset=digits", "data.num_clients=6", "server.clients_per_round=3", "rounds=4", "eval_every=2",
    "client.local_steps=3", "client.lr=0.05", "data.validation_fraction=0.1",
]


def fake_run(folder: Path, *, algorithm: str = "fedavg", aggregator: str = "mean", seed: int = 0, lr: float = 1.0,
             threshold: float = 0.4, curve: list[float], validation: float | None = None,
             ood: float | None = None, shape: str = "flat") -> Path:
    """A run folder written by hand: test accuracy ``curve`` at rounds 10, 20, ...; summary from it.

    ``shape`` is the config.toml's: "flat" (written before the per-part tables) or "parts"."""
    folder.mkdir(parents=True)
    config = {"name": "fake", "seed": seed, "algorithm": algorithm,
              "server": {"aggregator": aggregator, "lr": lr, "threshold": threshold}, "data": {"alpha": 0.1}}
    if shape == "parts":
        table = {"name": aggregator, **({"threshold": threshold} if aggregator == "gma" else {})}
        config = {"name": "fake", "seed": seed, "algorithm": algorithm,
                  "server": {"aggregator": table, "optimizer": {"name": "sgd", "lr": lr}},
                  "data": {"partition": {"name": "dirichlet", "alpha": 0.1}}}
    (folder / "config.toml").write_text(tomli_w.dumps(config))
    metrics = []
    for i, accuracy in enumerate(curve, 1):
        record = {"round": 10 * i, "test_accuracy": accuracy}
        if validation is not None:
            record["validation_accuracy"] = validation
        if ood is not None:
            record["ood_accuracy"] = record["ood/rot90_accuracy"] = ood
        metrics.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    rounds = [{"round": r, "mask_density": 0.5, "mask_pass_fraction": 0.4, "agreement_mean": 0.3,
               "agreement_histogram": [1] * 10, "mask_density/w": 0.5, "agreement_histogram/w": [1] * 10}
              for r in range(1, 10 * len(curve) + 1)] if aggregator == "gma" else []
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    final = {k: v for k, v in metrics[-1].items() if k.endswith("_accuracy")}
    final["round"] = metrics[-1]["round"]
    best = max(metrics, key=lambda m: m["test_accuracy"])
    summary = {"algorithm": algorithm, "aggregator": aggregator, "seed": seed, "final": final,
               "best": {"round": best["round"], "test_accuracy": best["test_accuracy"]}, "wall_s": 1.0}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sweep on digits: fedavg × {mean, gma} × 3 seeds."""
    root = tmp_path_factory.mktemp("runs")
    run_sweep(plan_sweep(PAPER, [parse_grid("server.aggregator=mean,gma")], 3, root / "dir", TINY))
    return root


def _last_20(metrics: list[dict], key: str = "test_accuracy") -> float:
    """The mean of ``key`` over the evaluations in rounds (0.8 H, H], computed here from scratch."""
    horizon = metrics[-1]["round"]
    return statistics.fmean(m[key] for m in metrics if m["round"] > 0.8 * horizon)


def test_table_matches_the_run_folders(real_runs: Path, tmp_path: Path) -> None:
    result = write_report(real_runs, tmp_path)
    folders = {p.parent.name: p.parent for p in real_runs.rglob("summary.json")}
    summaries = {name: json.loads((f / "summary.json").read_text()) for name, f in folders.items()}
    metrics = {name: [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]
               for name, f in folders.items()}
    assert len(summaries) == 6
    for row in result["rows"]:
        mine = [name for name in summaries if name.startswith(f"aggregator={row['aggregator']}_")]
        last = [_last_20(metrics[n]) for n in mine]
        final = [summaries[n]["final"]["test_accuracy"] for n in mine]
        at_best = [max(metrics[n], key=lambda m: m["validation_accuracy"])["test_accuracy"] for n in mine]
        validation = [_last_20(metrics[n], "validation_accuracy") for n in mine]
        assert row["seeds"] == 3 and row["setting"] == "dir"
        assert row["last_test_accuracy"] == pytest.approx((statistics.fmean(last), statistics.stdev(last)))
        assert row["final_round_test_accuracy"] == pytest.approx((statistics.fmean(final), statistics.stdev(final)))
        assert row["test_accuracy_at_best_validation"] == pytest.approx(
            (statistics.fmean(at_best), statistics.stdev(at_best)))
        assert row["last_validation_accuracy"] == pytest.approx(
            (statistics.fmean(validation), statistics.stdev(validation)))
        assert "best_test_accuracy" not in row  # "best" is never chosen on the test set
    # the CSV holds the same numbers
    with open(tmp_path / "summary.csv") as handle:
        table = {r["aggregator"]: r for r in csv.DictReader(handle)}
    for row in result["rows"]:
        assert float(table[row["aggregator"]]["last_test_accuracy_mean"]) == pytest.approx(
            row["last_test_accuracy"][0])
    # the gain is gma − mean of the last-20% metric, paired by seed
    by_seed = {(summaries[n]["aggregator"], summaries[n]["seed"]): _last_20(metrics[n]) for n in summaries}
    diffs = [by_seed[("gma", k)] - by_seed[("mean", k)] for k in range(3)]
    (gain,) = result["gains"]
    assert (gain["method"], gain["baseline"], gain["seeds"]) == ("gma", "mean", 3)
    assert gain["difference"] == pytest.approx(statistics.fmean(diffs))
    half = 4.302653 * statistics.stdev(diffs) / 3**0.5
    assert (gain["ci_low"], gain["ci_high"]) == pytest.approx((statistics.fmean(diffs) - half,
                                                               statistics.fmean(diffs) + half))
    assert gain["p_holm"] == gain["p"]  # one comparison: Holm changes nothing
    markdown = (tmp_path / "summary.md").read_text()
    mean_row = next(r for r in result["rows"] if r["aggregator"] == "mean")
    assert f"{100 * mean_row['last_test_accuracy'][0]:.2f} ± {100 * mean_row['last_test_accuracy'][1]:.2f}" \
        in markdown
    assert "test acc % (last 20%)" in markdown and "final-round test acc %" in markdown and "best test" not in markdown
    for name in ("report.md", "report.html", "gains.md", "gains.csv", "plots/curves.png", "plots/mask_dir.png",
                 "plots/gains.png", "plots/gain_map.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "plots" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_folders_of_either_config_shape_report_the_same(tmp_path: Path) -> None:
    for shape in ("flat", "parts"):
        for seed in (0, 1):
            fake_run(tmp_path / shape / "s" / f"aggregator=mean_seed{seed}", seed=seed, curve=[0.5, 0.6 + seed / 100],
                     threshold=0.7, ood=0.25, shape=shape, validation=0.5)  # a τ plain averaging never used: dropped
            fake_run(tmp_path / shape / "s" / f"aggregator=gma_seed{seed}", aggregator="gma", seed=seed, threshold=0.3,
                     curve=[0.5, 0.64 + seed / 50], ood=0.3, shape=shape, validation=0.6)
    flat, parts = (make_groups(find_runs(tmp_path / shape)) for shape in ("flat", "parts"))
    assert table_rows(flat) == table_rows(parts)
    assert gain_rows(flat) == gain_rows(parts)
    test, ood = gain_rows(parts)
    assert (test["metric"], ood["metric"]) == ("test_accuracy", "ood_accuracy")
    assert (test["tau"], test["lr_baseline"], test["lr_method"]) == (0.3, 1.0, 1.0)
    assert test["difference"] == pytest.approx(0.045)  # seeds: 0.64 − 0.60, 0.66 − 0.61
    run = find_runs(tmp_path / "flat")[0]
    assert run.config["server"]["optimizer"] == {"lr": 1.0} and run.config["data"]["partition"]["alpha"] == 0.1
    assert select_server_lr(tmp_path / "flat") == select_server_lr(tmp_path / "parts")
    with pytest.raises(ValueError, match="chosen on validation only"):
        select_server_lr(tmp_path / "flat", metric="test_accuracy")


def test_same_folder_names_in_different_settings_are_not_mixed(tmp_path: Path) -> None:
    fake_run(tmp_path / "a" / "aggregator=mean_seed0", curve=[0.5, 0.6])
    fake_run(tmp_path / "b" / "aggregator=mean_seed0", curve=[0.7, 0.8])
    rows = table_rows(make_groups(find_runs(tmp_path)))
    assert {(r["setting"], r["seeds"], r["last_test_accuracy"][0]) for r in rows} == {("a", 1, 0.6), ("b", 1, 0.8)}


def test_server_lr_is_selected_on_validation_never_on_test(tmp_path: Path) -> None:
    # lr 2 has the better *test* accuracy but the worse validation accuracy: lr 1 must be chosen
    for seed in (0, 1):
        fake_run(tmp_path / "t" / f"aggregator=mean_lr=1_seed{seed}", lr=1.0, seed=seed, curve=[0.6], validation=0.7)
        fake_run(tmp_path / "t" / f"aggregator=mean_lr=2_seed{seed}", lr=2.0, seed=seed, curve=[0.9], validation=0.5)
        fake_run(tmp_path / "t" / f"aggregator=gma_lr=1_seed{seed}", aggregator="gma", lr=1.0, seed=seed,
                 curve=[0.5], validation=0.4)
        fake_run(tmp_path / "t" / f"aggregator=gma_lr=2_seed{seed}", aggregator="gma", lr=2.0, seed=seed,
                 curve=[0.65 + 0.01 * seed], validation=0.6)
    chosen = select_server_lr(tmp_path)
    assert chosen[("fedavg", "mean")]["lr"] == 1.0 and chosen[("fedavg", "gma")]["lr"] == 2.0
    assert (chosen[("fedavg", "mean")]["edge"], chosen[("fedavg", "gma")]["edge"]) == ("low", "high")
    groups = make_groups(find_runs(tmp_path))
    assert {(g.aggregator, g.server_lr) for g in groups if g.selected} == {("mean", 1.0), ("gma", 2.0)}
    (gain,) = gain_rows(groups)
    assert (gain["lr_baseline"], gain["lr_method"]) == (1.0, 2.0)
    assert gain["difference"] == pytest.approx(0.055)  # seeds: 0.65 − 0.6, 0.66 − 0.6
    # two seeds: 0.055 ± 12.706 · 0.00707 / √2 includes 0
    assert gain["ci_low"] < 0 < gain["ci_high"] and gain["significant"] is False


def test_significance_follows_the_paired_t_test(tmp_path: Path) -> None:
    # diffs +0.02, +0.03, +0.04: mean 0.03, std 0.01, half-width 4.303·0.01/√3 = 0.0248 → excludes 0;
    # t = 0.03 / (0.01 / √3) = 3√3 with 2 degrees of freedom: p = 1 − t / √(t² + 2) = 0.0351
    for seed, gma_final in enumerate([0.62, 0.63, 0.64]):
        fake_run(tmp_path / "s" / f"aggregator=mean_seed{seed}", seed=seed, curve=[0.6])
        fake_run(tmp_path / "s" / f"aggregator=gma_seed{seed}", aggregator="gma", seed=seed, curve=[gma_final])
    (gain,) = gain_rows(make_groups(find_runs(tmp_path)))
    assert gain["ci_high"] - gain["difference"] == pytest.approx(4.302653 * 0.01 / 3**0.5)
    t = 3 * 3**0.5
    assert gain["p"] == pytest.approx(1 - t / (t**2 + 2) ** 0.5) and gain["significant"] is True
    # a gain of the same size with noise three times larger is not significant
    noisy = tmp_path / "noisy"
    for seed, gma_final in enumerate([0.60, 0.63, 0.66]):
        fake_run(noisy / "s" / f"aggregator=mean_seed{seed}", seed=seed, curve=[0.6])
        fake_run(noisy / "s" / f"aggregator=gma_seed{seed}", aggregator="gma", seed=seed, curve=[gma_final])
    (gain,) = gain_rows(make_groups(find_runs(noisy)))
    assert gain["ci_low"] < 0 and gain["significant"] is False


def test_rounds_to_target_uses_plain_averaging_last_20_percent(tmp_path: Path) -> None:
    # plain averaging over rounds 10..100 ends at 0.8, 1.0: its last-20% accuracy is 0.9, the target
    # 0.8 × 0.9 = 0.72, first reached at round 80 (0.76); the final round's 1.0 would give 0.8, round 90
    fake_run(tmp_path / "s" / "aggregator=mean_seed0", curve=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.76, 0.8, 1.0])
    fake_run(tmp_path / "s" / "aggregator=gma_seed0", aggregator="gma", curve=[0.96] * 9 + [0.99])
    rows = {r["aggregator"]: r for r in table_rows(make_groups(find_runs(tmp_path)), target_fraction=0.8)}
    assert rows["mean"]["target"] == rows["gma"]["target"] == pytest.approx(0.72)
    assert rows["mean"]["rounds_to_target"] == 80 and rows["gma"]["rounds_to_target"] == 10
    assert rounds_to_target([{"round": 5, "test_accuracy": 0.1}], 0.5) is None
    absolute = table_rows(make_groups(find_runs(tmp_path)), target=0.99)
    assert {r["aggregator"]: r["rounds_to_target"] for r in absolute} == {"mean": 100, "gma": 100}


def test_tau_sweep_gets_its_own_plot(tmp_path: Path) -> None:
    for tau in (0.0, 0.4, 0.8):
        fake_run(tmp_path / "tau" / f"threshold={tau}_seed0", aggregator="gma", threshold=tau, curve=[0.5 + tau / 10])
    result = write_report(tmp_path, tmp_path / "out")
    assert (tmp_path / "out" / "plots" / "tau_tau_fedavg.png").is_file()
    assert [r["threshold"] for r in result["rows"]] == [0.0, 0.4, 0.8]


def test_a_rewritten_report_drops_the_figures_it_no_longer_writes(tmp_path: Path) -> None:
    """One setting, then two: the first report's mask figure (named after its only setting) is removed,
    a file of another name in plots/ is kept."""
    for seed in (0, 1):
        for aggregator in ("mean", "gma"):
            fake_run(tmp_path / "runs" / "a" / f"aggregator={aggregator}_seed{seed}", aggregator=aggregator,
                     seed=seed, curve=[0.5, 0.6 + seed / 100])
    out = tmp_path / "out"
    first = {p.name for p in write_report(tmp_path / "runs" / "a", out)["figures"]}
    (out / "plots" / "mine.png").write_bytes(b"kept")
    for seed in (0, 1):
        for aggregator in ("mean", "gma"):
            fake_run(tmp_path / "runs" / "b" / f"aggregator={aggregator}_seed{seed}", aggregator=aggregator,
                     seed=seed, curve=[0.7, 0.8 + seed / 100])
    second = {p.name for p in write_report(tmp_path / "runs", out)["figures"]}
    assert "mask_runs.png" in first and "mask_runs.png" not in second
    assert {p.name for p in (out / "plots").iterdir()} == second | {"mine.png"}


def test_out_of_distribution_accuracy_gets_a_gain_column_and_a_curve_row(tmp_path: Path) -> None:
    for seed, (ood_mean, ood_gma) in enumerate([(0.30, 0.35), (0.32, 0.36), (0.31, 0.38)]):
        fake_run(tmp_path / "rot" / f"aggregator=mean_seed{seed}", seed=seed, curve=[0.8, 0.9], ood=ood_mean)
        fake_run(tmp_path / "rot" / f"aggregator=gma_seed{seed}", aggregator="gma", seed=seed, curve=[0.8, 0.9],
                 ood=ood_gma)
    result = write_report(tmp_path, tmp_path / "out")
    test, ood = result["gains"]
    assert ood["metric"] == "ood_accuracy" and ood["difference"] == pytest.approx((0.05 + 0.04 + 0.07) / 3)
    assert test["metric"] == "test_accuracy" and test["difference"] == 0.0
    # per-domain accuracies stay in the table only
    assert [g["metric"] for g in result["gains"]] == ["test_accuracy", "ood_accuracy"]
    assert "### ood accuracy (last 20% of rounds)" in (tmp_path / "out" / "gains.md").read_text()
    assert "ood/rot90 acc % (last 20%)" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "plots" / "curves.png").is_file()


def test_t_quantile() -> None:
    # Student's t 97.5% quantiles (tables: 12.706, 4.303, 2.074, 1.984)
    assert [round(t_quantile(d), 3) for d in (1, 2, 22, 100)] == [12.706, 4.303, 2.074, 1.984]
    assert t_quantile(0) != t_quantile(0)  # nan


def test_cli_report_writes_tables_and_rejects_an_empty_folder(real_runs: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(real_runs), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "difference (points)" in result.output and (tmp_path / "r" / "summary.md").is_file()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no finished runs" in result.output
    result = CliRunner().invoke(main, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.fixture(scope="module")
def flat_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sweep written into one flat folder: Dirichlet α × aggregator on digits, one seed; plus a
    failed run (error.txt) and an unfinished one (config only)."""
    root = tmp_path_factory.mktemp("flat") / "sweep"
    grid = [parse_grid("data.partition.alpha=0.1,1.0"), parse_grid("server.aggregator=mean,gma")]
    run_sweep(plan_sweep(PAPER, grid, 1, root, TINY))
    for name, error in (("broken", "RuntimeError: out of memory"), ("running", None)):
        (root / name).mkdir()
        (root / name / "config.toml").write_text((root / "alpha=0.1_aggregator=gma_seed0" / "config.toml").read_text())
        if error:
            (root / name / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")
    return root


def test_flat_sweep_is_grouped_by_its_configs(flat_sweep: Path, tmp_path: Path) -> None:
    result = write_report(flat_sweep, tmp_path)
    assert result["swept"] == ["data.partition.alpha", "server.aggregator.name"]  # not τ: mean has none
    summaries = {p.parent.name: json.loads(p.read_text()) for p in flat_sweep.rglob("summary.json")}
    got = {(r["config"]["Dirichlet α"], r["aggregator"]): r["final_round_test_accuracy"][0] for r in result["rows"]}
    assert got == {(shown, agg): summaries[f"alpha={alpha}_aggregator={agg}_seed0"]["final"]["test_accuracy"]
                   for alpha, shown in (("0.1", "0.1"), ("1.0", "1")) for agg in ("mean", "gma")}
    assert [r["setting"] for r in result["rows"]] == ["Dirichlet α=0.1"] * 2 + ["Dirichlet α=1"] * 2
    groups = make_groups(find_runs(flat_sweep))
    for setting in {g.setting for g in groups}:
        labels = [g.label for g in groups if g.setting == setting]
        assert sorted(labels) == ["fedavg + gma (τ=0.4)", "fedavg + mean"]
    markdown = (tmp_path / "summary.md").read_text()
    header = markdown.splitlines()[0]
    assert header.startswith("| Dirichlet α | algorithm | aggregator | τ | server lr | seeds |")
    assert header.count("aggregator") == 1 and "setting" not in header
    assert "| 1 | fedavg | gma | 0.4 |" in markdown
    assert " ± " not in markdown  # one seed: no std to show
    report = (tmp_path / "report.md").read_text()
    assert "4 finished runs in 4 configurations, 0 diverged, 1 failed, 1 unfinished." in report
    assert "- failed: broken: RuntimeError: out of memory" in report and "- unfinished: running" in report
    assert [g["setting"] for g in result["gains"]] == ["Dirichlet α=0.1", "Dirichlet α=1"]
    with open(tmp_path / "summary.csv") as handle:
        assert {r["Dirichlet α"] for r in csv.DictReader(handle)} == {"0.1", "1"}


def test_every_aggregator_appears_in_the_curves(tmp_path: Path) -> None:
    from fedgma.report.figures import group_name

    for aggregator in ("mean", "median", "trimmed_mean", "gma"):
        fake_run(tmp_path / "f" / f"aggregator={aggregator}_seed0", aggregator=aggregator, curve=[0.4, 0.5],
                 shape="parts")
    groups = make_groups(find_runs(tmp_path / "f"))
    assert sorted(group_name(g) for g in groups) == [
        "fedavg + gma (τ=0.4)", "fedavg + mean", "fedavg + median", "fedavg + trimmed_mean"]
    result = write_report(tmp_path / "f", tmp_path / "out")
    assert (tmp_path / "out" / "plots" / "curves.png") in result["figures"]
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "out" / "plots" / "curves.png")
    assert image.shape[1] >= 600 and image.shape[0] >= 400  # sized for content, not 378 x 306


def test_plural() -> None:
    from fedgma.report.write import plural

    assert (plural(1, "run"), plural(2, "run"), plural(0, "configuration")) == ("1 run", "2 runs", "0 configurations")


def test_layer_names_are_readable() -> None:
    from fedgma.report.figures import layer_names

    assert layer_names(["1.weight", "1.bias", "3.weight", "3.bias"]) == {
        "1.weight": "layer 1 weights", "1.bias": "layer 1 biases", "3.weight": "layer 2 weights",
        "3.bias": "layer 2 biases"}
    assert layer_names(["conv.weight", "w"]) == {"conv.weight": "layer 1 weights (conv)", "w": "w"}
